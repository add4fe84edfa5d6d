//! Where a resumed `produce` picks up: each message carries its source and CSV line, and a
//! resume reads the topic once to find every line of its source already there.
//!
//! The label travels in the payload, as two fields the events' parsing ignores
//! (`{"userId":1,…,"_source":"ratings.csv","_line":2}`), not in Kafka headers: tansu, the broker
//! the tests run, serves messages with headers at a few hundred per second and then stalls.
//!
//! Why all of the topic and not just each partition's tail: a broker that fails or restarts
//! mid-run can refuse a batch while accepting the next, leaving a gap that a tail would hide.
//! Reading everything costs seconds per million messages, once per resume, and no line is
//! ever skipped unless the topic holds it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;

use crate::kafka::KafkaOptions;
use crate::{JobError, Result};

/// The payload field naming the file a message came from.
pub const SOURCE_FIELD: &str = "_source";
/// The payload field holding the message's line number in that file.
pub const LINE_FIELD: &str = "_line";

/// How long the scan may go without a message before it gives up on the broker.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// `payload`, a JSON object, with the source and line fields added at its end.
pub fn labelled(payload: String, source_json: &str, line: u64) -> String {
    let Some(body) = payload.strip_suffix('}') else { return payload };
    let sep = if body.ends_with('{') { "" } else { "," };
    format!("{body}{sep}\"{SOURCE_FIELD}\":{source_json},\"{LINE_FIELD}\":{line}}}")
}

#[derive(Deserialize)]
struct Label<'a> {
    #[serde(rename = "_source", borrow)]
    source: Option<Cow<'a, str>>,
    #[serde(rename = "_line")]
    line: Option<u64>,
}

/// The source and line a payload carries, if `produce` sent it.
pub fn origin(payload: &[u8]) -> Option<(Cow<'_, str>, u64)> {
    let label: Label<'_> = serde_json::from_slice(payload).ok()?;
    Some((label.source?, label.line?))
}

/// The lines of one source that a topic holds.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Landed {
    /// One bit per line number.
    bits: Vec<u64>,
    lines: u64,
}

impl Landed {
    /// Records that the topic holds line `line`.
    pub fn insert(&mut self, line: u64) {
        let (word, bit) = ((line / 64) as usize, line % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) == 0 {
            self.bits[word] |= 1 << bit;
            self.lines += 1;
        }
    }

    /// Whether the topic holds line `line` already.
    pub fn holds(&self, line: u64) -> bool {
        self.bits.get((line / 64) as usize).is_some_and(|w| w & (1 << (line % 64)) != 0)
    }

    /// How many distinct lines the topic holds.
    pub fn lines(&self) -> u64 {
        self.lines
    }
}

/// Reads every partition of `topic` from its first offset to its end and collects the lines
/// of `source` in it. Lines above `max_line` cannot be the file's (a header claiming one is
/// not ours), and ignoring them bounds the memory a hostile header could claim.
pub fn find_landed(kafka: &KafkaOptions, topic: &str, source: &str, max_line: u64) -> Result<Landed> {
    let consumer: BaseConsumer = kafka
        .client_config(&[("group.id", "lensflow-produce-resume"), ("enable.auto.commit", "false"), ("enable.partition.eof", "false")])
        .create()
        .map_err(JobError::kafka("create the resume scanner"))?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30)).map_err(JobError::kafka(format!("metadata of {topic}")))?;
    let partitions: Vec<i32> = metadata.topics().iter().filter(|t| t.name() == topic).flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    // Where each partition ends now: messages after that are not ours (we are not sending).
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(30)).map_err(JobError::kafka(format!("end offsets of {topic}/{p}")))?;
        if high > low {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Offset(low)).map_err(JobError::kafka(format!("seek {topic}/{p}")))?;
        }
    }
    let mut landed = Landed::default();
    if ends.is_empty() {
        return Ok(landed);
    }
    consumer.assign(&tpl).map_err(JobError::kafka(format!("assign the partitions of {topic}")))?;
    let (started, mut last_message) = (Instant::now(), Instant::now());
    let mut read = 0u64;
    while !ends.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_message = Instant::now();
                read += 1;
                let (p, offset) = (m.partition(), m.offset());
                if ends.get(&p).is_some_and(|end| offset < *end)
                    && let Some((from, line)) = m.payload().and_then(origin)
                    && from == source
                    && line <= max_line
                {
                    landed.insert(line);
                }
                if ends.get(&p).is_some_and(|end| offset + 1 >= *end) {
                    ends.remove(&p);
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "kafka, while finding where to resume"),
            None if last_message.elapsed() > STALL_TIMEOUT => {
                return Err(JobError::Internal(format!(
                    "reading {topic} for --resume: no message for {STALL_TIMEOUT:?} with partitions {:?} unfinished",
                    ends.keys()
                )));
            }
            None => {}
        }
    }
    tracing::info!(topic, source, read, held = landed.lines(), seconds = started.elapsed().as_secs_f64(), "read the topic to resume");
    Ok(landed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_rides_in_the_payload_and_reads_back() {
        let source = serde_json::to_string("my \"ratings\".csv").unwrap();
        let payload = labelled(r#"{"userId":1,"rating":4.0}"#.to_string(), &source, 12);
        let json: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert_eq!((json["userId"].as_i64(), json["_line"].as_u64()), (Some(1), Some(12)));
        assert_eq!(origin(payload.as_bytes()), Some((Cow::Borrowed("my \"ratings\".csv"), 12)));
        assert_eq!(origin(labelled("{}".into(), &source, 3).as_bytes()).map(|(_, l)| l), Some(3));
        for unlabelled in [&br#"{"userId":1}"#[..], b"not json", br#"{"_source":"a","_line":-1}"#, br#"{"_source":7,"_line":1}"#] {
            assert_eq!(origin(unlabelled), None, "{}", String::from_utf8_lossy(unlabelled));
        }
    }

    #[test]
    fn holds_exactly_the_lines_inserted() {
        let mut landed = Landed::default();
        for line in [2, 3, 64, 700, 3] {
            landed.insert(line);
        }
        assert_eq!(landed.lines(), 4, "a line inserted twice counts once");
        assert!([2, 3, 64, 700].iter().all(|l| landed.holds(*l)));
        assert!([0, 1, 4, 63, 65, 699, 701, 1 << 40].iter().all(|l| !landed.holds(*l)));
    }
}
