//! Where each partition resumes, as the lake's manifests say. This, not the consumer group's
//! committed offset, is the source of truth: a batch is in the lake exactly when its manifest
//! is, so resuming right after the manifests' offsets neither loses nor repeats an event.

use std::collections::BTreeMap;

use lensflow_core::{BatchManifest, Lake, StoreError};

use crate::Result;

/// The lake's view of the topic: the last batch read and the next offset of every partition.
#[derive(Debug, Clone, Default)]
pub struct LakeOffsets {
    topic: String,
    last_batch: u64,
    next: BTreeMap<i32, i64>,
}

impl LakeOffsets {
    /// An empty view for `topic`; call [`LakeOffsets::refresh`] to read the lake.
    pub fn new(topic: &str) -> Self {
        LakeOffsets { topic: topic.to_string(), ..Default::default() }
    }

    /// Reads the manifests committed since the last refresh; returns how many there were.
    pub async fn refresh(&mut self, lake: &Lake) -> Result<usize> {
        let manifests = lake.manifests_after(self.last_batch).await?;
        for m in &manifests {
            self.apply(m)?;
        }
        Ok(manifests.len())
    }

    /// Moves the view past one more manifest, checking that it neither skips a batch number
    /// nor covers offsets an earlier batch already holds.
    pub fn apply(&mut self, m: &BatchManifest) -> Result<()> {
        if m.topic != self.topic {
            return Err(StoreError::LakeContent(format!(
                "batch {} holds topic `{}`, this consumer reads `{}`: one lake per topic",
                m.batch, m.topic, self.topic
            ))
            .into());
        }
        if m.batch != self.last_batch + 1 {
            return Err(StoreError::LakeContent(format!("batch {} follows batch {}", m.batch, self.last_batch)).into());
        }
        for (&p, range) in &m.partitions {
            if let Some(&next) = self.next.get(&p)
                && range.first < next
            {
                return Err(StoreError::LakeContent(format!(
                    "batch {} holds offsets {}..={} of partition {p}, but offsets below {next} were already in the lake",
                    m.batch, range.first, range.last
                ))
                .into());
            }
            self.next.insert(p, range.next());
        }
        self.last_batch = m.batch;
        Ok(())
    }

    /// The offset `partition` resumes from, or `None` if the lake has nothing of it yet.
    pub fn next_offset(&self, partition: i32) -> Option<i64> {
        self.next.get(&partition).copied()
    }

    /// The newest batch number seen.
    pub fn last_batch(&self) -> u64 {
        self.last_batch
    }
}
