//! Event-time alignment of the partitions one consumer owns.
//!
//! Kafka keeps order within a partition only. Reading a backlog, librdkafka fetches each
//! partition in chunks, and a partition whose events are sparser in time runs ahead: one batch
//! then holds a month of one partition and a day of another, and every later batch brings
//! events older than what the lake already holds. The trainer recomputes the stored rows such
//! late events change, so rounds grow with the drift (docs/scaling.md).
//!
//! Each owned partition is a [`Lane`]: the next offset it expects, and the messages held back
//! because their event time runs more than `max_skew` ahead of the slowest lane. The slowest
//! lane's mark is the time of its first held message, or of the newest one it released; a lane
//! read to its end with nothing held does not hold the others back, and a lane that has shown no
//! event yet since it was assigned holds every timed message back until it does. A lane whose
//! held messages pass its share of `cap` is paused at the broker and resumed once they drain
//! (librdkafka refetches from the last message delivered), so memory stays bounded however far
//! the partitions drift. Held messages are not in any batch: a crash or a revocation loses
//! nothing, since the lake's offsets say where each partition resumes.

use std::collections::{BTreeMap, VecDeque};

/// Fewest held messages a lane may keep before it is paused, however many lanes share `cap`.
const MIN_LANE_HOLD: usize = 1_000;

/// One owned partition: where it is, and what is held back.
#[derive(Debug)]
pub struct Lane<T> {
    /// The next offset expected (`None`: whatever comes first).
    pub next: Option<i64>,
    /// Messages in offset order, each with its event time (`None`: a dead letter).
    held: VecDeque<(Option<i64>, T)>,
    /// The newest event time released from this lane since it was assigned.
    newest: Option<i64>,
    /// Read to its end since its last message.
    at_end: bool,
    /// Paused at the broker because it holds its share of messages.
    paused: bool,
}

impl<T> Lane<T> {
    fn new(next: Option<i64>) -> Lane<T> {
        Lane { next, held: VecDeque::new(), newest: None, at_end: false, paused: false }
    }

    /// Whether the lane is paused at the broker (a dropped lane's partition must be resumed).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// How many messages the lane holds.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Whether the lane still counts for the slowest mark: it has messages or may get more.
    fn active(&self) -> bool {
        !(self.at_end && self.held.is_empty())
    }

    /// The time the lane has reached (`None`: nothing shown yet).
    fn mark(&self) -> Option<i64> {
        self.held.front().and_then(|(t, _)| *t).or(self.newest)
    }
}

/// What [`Lanes::flow`] asks of the broker.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Partitions to pause.
    pub pause: Vec<i32>,
    /// Partitions to resume.
    pub resume: Vec<i32>,
}

/// The lanes of the partitions one consumer owns.
#[derive(Debug)]
pub struct Lanes<T> {
    /// How far ahead of the slowest lane a message may be released (`None`: no alignment,
    /// every message is released as it arrives).
    max_skew: Option<i64>,
    /// Held messages, over all lanes, before lanes are paused.
    cap: usize,
    lanes: BTreeMap<i32, Lane<T>>,
}

impl<T> Lanes<T> {
    /// No lanes yet; `max_skew` in the units of the pipeline's time column.
    pub fn new(max_skew: Option<i64>, cap: usize) -> Lanes<T> {
        Lanes { max_skew, cap, lanes: BTreeMap::new() }
    }

    /// Starts (or restarts) the lane of a newly assigned partition; returns the old lane, whose
    /// held messages are dropped and which the broker may still have paused.
    pub fn assign(&mut self, partition: i32, next: Option<i64>) -> Option<Lane<T>> {
        self.lanes.insert(partition, Lane::new(next))
    }

    /// Ends the lane of a revoked partition, returning it (see [`Lanes::assign`]).
    pub fn revoke(&mut self, partition: i32) -> Option<Lane<T>> {
        self.lanes.remove(&partition)
    }

    /// Restarts a lane from `next`, dropping what it held; returns how many messages that was.
    pub fn restart(&mut self, partition: i32, next: Option<i64>) -> usize {
        let Some(lane) = self.lanes.get_mut(&partition) else { return 0 };
        let dropped = lane.held.len();
        lane.held.clear();
        lane.next = next;
        lane.newest = None;
        dropped
    }

    /// The lane of `partition`, when it is owned.
    pub fn get_mut(&mut self, partition: i32) -> Option<&mut Lane<T>> {
        self.lanes.get_mut(&partition)
    }

    /// The owned partitions.
    pub fn partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.lanes.keys().copied()
    }

    /// Whether this consumer owns no partition.
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Queues a message of an owned partition with its event time.
    pub fn hold(&mut self, partition: i32, time: Option<i64>, message: T) {
        if let Some(lane) = self.lanes.get_mut(&partition) {
            lane.at_end = false;
            lane.held.push_back((time, message));
        }
    }

    /// Notes that `partition` is read to its end.
    pub fn end(&mut self, partition: i32) {
        if let Some(lane) = self.lanes.get_mut(&partition) {
            lane.at_end = true;
        }
    }

    /// Whether every owned partition is read to its end with nothing held.
    pub fn all_at_end(&self) -> bool {
        self.lanes.values().all(|l| !l.active())
    }

    /// Messages held over all lanes.
    pub fn held(&self) -> usize {
        self.lanes.values().map(|l| l.held.len()).sum()
    }

    /// Lanes paused at the broker.
    pub fn paused(&self) -> usize {
        self.lanes.values().filter(|l| l.paused).count()
    }

    /// The latest time a message may have to be released: the slowest active lane's mark plus
    /// `max_skew`. `None` while an active lane has shown no event: only untimed messages go.
    fn limit(&self) -> Option<i64> {
        let Some(skew) = self.max_skew else { return Some(i64::MAX) };
        let mut floor = i64::MAX;
        for lane in self.lanes.values().filter(|l| l.active()) {
            floor = floor.min(lane.mark()?);
        }
        Some(floor.saturating_add(skew))
    }

    /// Releases up to `room` held messages whose time is within `max_skew` of the slowest lane,
    /// each lane's in offset order, into `out`; returns how many.
    pub fn release(&mut self, room: usize, mut out: impl FnMut(i32, T)) -> usize {
        let mut released = 0;
        loop {
            let limit = self.limit().unwrap_or(i64::MIN);
            let before = released;
            for (&partition, lane) in &mut self.lanes {
                while lane.held.front().is_some_and(|(t, _)| t.is_none_or(|t| t <= limit)) {
                    if released == room {
                        return released;
                    }
                    let Some((time, message)) = lane.held.pop_front() else { break };
                    if let Some(t) = time {
                        lane.newest = Some(lane.newest.map_or(t, |n| n.max(t)));
                    }
                    out(partition, message);
                    released += 1;
                }
            }
            // The slowest lane may have moved on: go again until nothing more is released.
            if released == before {
                return released;
            }
        }
    }

    /// Pauses lanes holding their share of `cap` and resumes those drained to a quarter of it.
    pub fn flow(&mut self) -> Flow {
        let share = (self.cap / self.lanes.len().max(1)).max(MIN_LANE_HOLD);
        let mut flow = Flow::default();
        for (&partition, lane) in &mut self.lanes {
            if !lane.paused && lane.held.len() >= share {
                lane.paused = true;
                flow.pause.push(partition);
            } else if lane.paused && lane.held.len() <= share / 4 {
                lane.paused = false;
                flow.resume.push(partition);
            }
        }
        flow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(lanes: &mut Lanes<&'static str>) -> Vec<(i32, &'static str)> {
        let mut out = vec![];
        lanes.release(usize::MAX, |p, m| out.push((p, m)));
        out
    }

    #[test]
    fn a_lane_running_ahead_waits_for_the_slowest() {
        let mut lanes = Lanes::new(Some(5), 100_000);
        lanes.assign(0, None);
        lanes.assign(1, None);
        lanes.hold(0, Some(100), "a100");
        lanes.hold(0, Some(200), "a200");
        assert_eq!(drain(&mut lanes), vec![], "partition 1 has shown nothing yet");
        lanes.hold(1, Some(102), "b102");
        lanes.hold(1, Some(150), "b150");
        assert_eq!(drain(&mut lanes), vec![(0, "a100"), (1, "b102"), (1, "b150")], "a200 is more than 5 ahead of b150");
        lanes.hold(1, Some(198), "b198");
        assert_eq!(drain(&mut lanes), vec![(0, "a200"), (1, "b198")]);
        // Partition 1 is read to its end: it no longer holds partition 0 back.
        lanes.hold(0, Some(900), "a900");
        assert_eq!(drain(&mut lanes), vec![], "partition 1 may still bring events up to 900");
        lanes.end(1);
        assert_eq!(drain(&mut lanes), vec![(0, "a900")]);
        lanes.end(0);
        assert!(lanes.all_at_end());
    }

    #[test]
    fn dead_letters_pass_and_room_is_respected() {
        let mut lanes = Lanes::new(Some(0), 100_000);
        lanes.assign(0, None);
        lanes.assign(1, None);
        lanes.hold(0, None, "dead");
        lanes.hold(0, Some(10), "a10");
        lanes.hold(1, Some(10), "b10");
        lanes.hold(1, Some(11), "b11");
        let mut out = vec![];
        assert_eq!(lanes.release(2, |p, m| out.push((p, m))), 2);
        assert_eq!(out, vec![(0, "dead"), (0, "a10")]);
        assert_eq!(drain(&mut lanes), vec![(1, "b10")], "b11 waits: partition 0 is at 10 and may bring more");
        assert_eq!(lanes.held(), 1);
    }

    #[test]
    fn without_alignment_everything_goes_at_once() {
        let mut lanes = Lanes::new(None, 100_000);
        lanes.assign(0, None);
        lanes.assign(1, None);
        lanes.hold(0, Some(1_000_000), "far ahead");
        assert_eq!(drain(&mut lanes), vec![(0, "far ahead")]);
    }

    #[test]
    fn a_full_lane_is_paused_and_resumed_once_drained() {
        let mut lanes = Lanes::new(Some(0), 2 * MIN_LANE_HOLD);
        lanes.assign(0, None);
        lanes.assign(1, None);
        lanes.hold(1, Some(0), "b0");
        for t in 1..=MIN_LANE_HOLD as i64 {
            lanes.hold(0, Some(t), "a");
        }
        drain(&mut lanes);
        assert_eq!(lanes.held(), MIN_LANE_HOLD, "partition 1 is at 0");
        assert_eq!(lanes.flow(), Flow { pause: vec![0], resume: vec![] });
        assert_eq!(lanes.flow(), Flow::default(), "paused once");
        lanes.hold(1, Some(MIN_LANE_HOLD as i64 * 4 / 5), "b");
        drain(&mut lanes);
        assert_eq!(lanes.flow(), Flow { pause: vec![], resume: vec![0] });
        let old = lanes.revoke(0).unwrap();
        assert!(!old.is_paused());
        assert_eq!(old.held(), MIN_LANE_HOLD / 5);
    }
}
