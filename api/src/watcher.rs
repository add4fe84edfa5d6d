//! Keeps the newest good round loaded. A background task looks at `LATEST` every poll
//! interval; when it names a round other than the one being served, the round is loaded and
//! checked off the request path, then swapped in with one atomic pointer store. Requests in
//! flight keep the `Arc` of the round they started with, so a swap never fails one. A round
//! that does not load is logged, the previous round keeps serving, and the bad round is tried
//! again only after a while.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use lensflow_core::model::{LatestPointer, MODEL_FILE, ModelArtifact};
use lensflow_core::predict::RoundSummary;
use lensflow_jobs::lake::Lake;
use object_store::path::Path;
use tokio_util::sync::CancellationToken;

use crate::ApiError;
use crate::metrics::Metrics;
use crate::round::{LoadedRound, summary};

/// How long a refused round is left alone before it is tried again.
const RETRY_REFUSED: Duration = Duration::from_secs(30);

/// The round being served and how it got there.
pub struct Models {
    store: Lake,
    current: ArcSwapOption<LoadedRound>,
    /// The last pointer that failed to load and when: a bad round is retried only now and then
    /// (its missing files may still arrive), not at every poll.
    refused: Mutex<Option<(LatestPointer, Instant)>>,
    /// Summaries of older rounds, read once each (rounds never change once written).
    history: Mutex<BTreeMap<u64, RoundSummary>>,
    metrics: Arc<Metrics>,
}

impl Models {
    /// Models from the store at `store`, none loaded yet.
    pub fn new(store: Lake, metrics: Arc<Metrics>) -> Models {
        Models {
            store,
            current: ArcSwapOption::empty(),
            refused: Mutex::new(None),
            history: Mutex::new(BTreeMap::new()),
            metrics,
        }
    }

    /// The round being served, if any.
    pub fn current(&self) -> Option<Arc<LoadedRound>> {
        self.current.load_full()
    }

    /// The model store's URL.
    pub fn store_url(&self) -> &str {
        self.store.url()
    }

    /// Looks at `LATEST` once and swaps in the round it names if that is new and good.
    /// Returns the round swapped in, if one was.
    pub async fn refresh(&self) -> Result<Option<u64>, ApiError> {
        let Some(pointer) = lensflow_jobs::train::latest(&self.store).await? else {
            return Ok(None);
        };
        if self.current().is_some_and(|r| r.pointer == pointer) || self.is_refused(&pointer) {
            return Ok(None);
        }
        match LoadedRound::load(&self.store, &pointer).await {
            Ok(mut round) => {
                round.history = Arc::new(self.history_up_to(&round).await);
                let number = round.round();
                let previous = self.current.swap(Some(Arc::new(round)));
                self.metrics.round_swapped(number);
                tracing::info!(
                    round = number,
                    previous = previous.map(|r| r.round()),
                    "serving round"
                );
                Ok(Some(number))
            }
            Err(e) => {
                self.metrics.round_refused();
                if matches!(e, ApiError::BadRound { .. }) {
                    tracing::error!(error = %e, "refused round; still serving the previous one");
                    if let Ok(mut refused) = self.refused.lock() {
                        *refused = Some((pointer, Instant::now()));
                    }
                }
                Err(e)
            }
        }
    }

    fn is_refused(&self, pointer: &LatestPointer) -> bool {
        let refused = self.refused.lock();
        refused
            .map(|r| {
                r.as_ref()
                    .is_some_and(|(p, at)| p == pointer && at.elapsed() < RETRY_REFUSED)
            })
            .unwrap_or(false)
    }

    /// Summaries of every round folder up to `round`'s, oldest first; unreadable ones are skipped.
    async fn history_up_to(&self, round: &LoadedRound) -> Vec<RoundSummary> {
        let listed = match self.store.store().list_with_delimiter(None).await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the model store; showing the served round only");
                return vec![round.summary()];
            }
        };
        let mut folders: Vec<(u64, String)> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| {
                let name = p.as_ref().trim_end_matches('/');
                name.strip_prefix("round-")
                    .and_then(|n| n.parse().ok())
                    .map(|n: u64| (n, name.to_string()))
            })
            .filter(|(n, _)| *n < round.round())
            .collect();
        folders.sort();
        let mut known = match self.history.lock() {
            Ok(h) => h.clone(),
            Err(_) => BTreeMap::new(),
        };
        for (n, folder) in folders {
            if known.contains_key(&n) {
                continue;
            }
            let path = Path::from(format!("{folder}/{MODEL_FILE}"));
            match self
                .store
                .get(&path)
                .await
                .map(|b| serde_json::from_slice::<ModelArtifact>(&b))
            {
                Ok(Ok(a)) => {
                    known.insert(n, summary(&a, &folder));
                }
                Ok(Err(e)) => {
                    tracing::warn!(round = n, error = %e, "skipping an unreadable round in the history")
                }
                Err(e) => {
                    tracing::warn!(round = n, error = %e, "skipping an unreadable round in the history")
                }
            }
        }
        known.insert(round.round(), round.summary());
        if let Ok(mut h) = self.history.lock() {
            h.clone_from(&known);
        }
        known
            .into_values()
            .filter(|s| s.round <= round.round())
            .collect()
    }

    /// Refreshes every `interval` until `shutdown`; errors are logged and retried next time.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        loop {
            // A bad round was logged where it was refused; anything else is worth a warning.
            if let Err(e) = self.refresh().await
                && !matches!(e, ApiError::BadRound { .. })
            {
                tracing::warn!(error = %e, "cannot read the model store; trying again");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
