//! Keeps the newest good round of every pipeline in the model store loaded. A background task
//! lists the store's pipelines (every folder `ROOT/<name>/` with a `LATEST`) and reads each
//! one's `LATEST` every poll interval; when it names a round other than the one being served, the
//! round is loaded, checked and compiled off the request path, then swapped in with one atomic
//! pointer store. Requests in flight keep the `Arc` of the round they started with, so a swap
//! never fails one. A round that does not load is logged, the previous round keeps serving, and
//! the bad round is tried again only after a while. Pipelines are independent: one pipeline's
//! bad round never holds back another's.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use lensflow_core::Lake;
use lensflow_core::model::{LATEST, LatestPointer, MODEL_FILE, ModelArtifact};
use lensflow_core::predict::RoundSummary;
use object_store::path::Path;
use tokio_util::sync::CancellationToken;

use crate::ApiError;
use crate::metrics::Metrics;
use crate::round::{LoadedRound, summary};

/// How long a refused round is left alone before it is tried again.
const RETRY_REFUSED: Duration = Duration::from_secs(30);

/// One pipeline of the model store: its folder and the round being served.
pub struct PipelineModels {
    name: String,
    store: Lake,
    current: ArcSwapOption<LoadedRound>,
    /// The last pointer that failed to load and when: a bad round is retried only now and then
    /// (its missing files may still arrive), not at every poll.
    refused: Mutex<Option<(LatestPointer, Instant)>>,
    /// Summaries of older rounds, read once each (rounds never change once written).
    history: Mutex<BTreeMap<u64, RoundSummary>>,
}

impl PipelineModels {
    /// The pipeline's name (its folder in the model store).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The round being served, if any.
    pub fn current(&self) -> Option<Arc<LoadedRound>> {
        self.current.load_full()
    }

    fn is_refused(&self, pointer: &LatestPointer) -> bool {
        self.refused.lock().map(|r| r.as_ref().is_some_and(|(p, at)| p == pointer && at.elapsed() < RETRY_REFUSED)).unwrap_or(false)
    }
}

/// What one look at the model store did.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// Rounds swapped in: (pipeline, round).
    pub swapped: Vec<(String, u64)>,
    /// Pipelines whose new round could not be loaded, with why.
    pub failed: Vec<(String, ApiError)>,
}

/// Every pipeline of the model store and the round each serves.
pub struct Models {
    root: Lake,
    default: String,
    pipelines: ArcSwap<BTreeMap<String, Arc<PipelineModels>>>,
    metrics: Arc<Metrics>,
}

impl Models {
    /// Models from the store at `root`, none loaded yet; `default` is the pipeline the seed
    /// routes answer for.
    pub fn new(root: Lake, default: impl Into<String>, metrics: Arc<Metrics>) -> Models {
        Models { root, default: default.into(), pipelines: ArcSwap::default(), metrics }
    }

    /// The model store's URL.
    pub fn store_url(&self) -> &str {
        self.root.url()
    }

    /// The pipeline the seed routes answer for.
    pub fn default_pipeline(&self) -> &str {
        &self.default
    }

    /// The pipelines found so far, by name.
    pub fn pipelines(&self) -> Arc<BTreeMap<String, Arc<PipelineModels>>> {
        self.pipelines.load_full()
    }

    /// A pipeline found in the store, by name.
    pub fn pipeline(&self, name: &str) -> Option<Arc<PipelineModels>> {
        self.pipelines.load().get(name).cloned()
    }

    /// The round `name` serves: 404 for a pipeline the store does not have (except the
    /// default, which is only not trained yet), 503 before its first round.
    pub fn serving(&self, name: &str) -> Result<Arc<LoadedRound>, ApiError> {
        match self.pipeline(name) {
            Some(p) => p.current().ok_or_else(|| ApiError::NotReady(name.to_string())),
            None if name == self.default => Err(ApiError::NotReady(name.to_string())),
            None => Err(ApiError::UnknownPipeline {
                name: name.to_string(),
                known: Some(self.pipelines.load().keys().cloned().collect::<Vec<_>>().join(", "))
                    .filter(|k| !k.is_empty())
                    .unwrap_or_else(|| "none yet".into()),
            }),
        }
    }

    /// Lists the store's pipelines, then looks at each one's `LATEST` and swaps in the round it
    /// names if that is new and good.
    pub async fn refresh(&self) -> Result<Refreshed, ApiError> {
        let mut out = Refreshed::default();
        for (name, pointer) in self.discover().await? {
            match self.refresh_pipeline(&name, pointer).await {
                Ok(Some(round)) => out.swapped.push((name, round)),
                Ok(None) => {}
                Err(e) => out.failed.push((name, e)),
            }
        }
        Ok(out)
    }

    /// Every folder of the store holding a `LATEST`, with what it says. A folder without one is
    /// not a pipeline (yet): its first round is still being written, or it is something else.
    async fn discover(&self) -> Result<Vec<(String, Result<LatestPointer, ApiError>)>, ApiError> {
        let listed = self.root.store().list_with_delimiter(None).await.map_err(lensflow_core::StoreError::store(self.root.url()))?;
        let mut found = Vec::new();
        for prefix in &listed.common_prefixes {
            let name = prefix.as_ref().trim_end_matches('/').to_string();
            let path = format!("{name}/{LATEST}");
            let bytes = match self.root.get(&Path::from(path.as_str())).await {
                Ok(bytes) => bytes,
                Err(e) if e.is_not_found() => continue,
                Err(e) => {
                    found.push((name, Err(e.into())));
                    continue;
                }
            };
            let pointer = serde_json::from_slice::<LatestPointer>(&bytes).map_err(|e| ApiError::BadRound {
                round: 0,
                path: self.root.url_of(&path),
                reason: format!("not a LATEST pointer: {e}"),
            });
            found.push((name, pointer));
        }
        Ok(found)
    }

    /// The pipeline `name`, added to the list the first time it is seen.
    fn slot(&self, name: &str) -> Arc<PipelineModels> {
        if let Some(p) = self.pipeline(name) {
            return p;
        }
        let slot = Arc::new(PipelineModels {
            name: name.to_string(),
            store: self.root.child(name),
            current: ArcSwapOption::empty(),
            refused: Mutex::new(None),
            history: Mutex::new(BTreeMap::new()),
        });
        self.pipelines.rcu(|map| {
            let mut map = BTreeMap::clone(map);
            map.entry(name.to_string()).or_insert_with(|| slot.clone());
            map
        });
        self.metrics.pipeline_found(name);
        tracing::info!(pipeline = name, "found a pipeline in the model store");
        self.pipeline(name).unwrap_or(slot)
    }

    /// Swaps in the round `pointer` names for pipeline `name`, if it is new and good. Returns
    /// the round swapped in, if one was.
    async fn refresh_pipeline(&self, name: &str, pointer: Result<LatestPointer, ApiError>) -> Result<Option<u64>, ApiError> {
        let slot = self.slot(name);
        let pointer = match pointer {
            Ok(p) => p,
            Err(e) => {
                // An unreadable LATEST is refused like a bad round: keyed by what is wrong with it.
                let key = LatestPointer { round: 0, path: LATEST.into(), model_sha256: e.to_string() };
                return if slot.is_refused(&key) { Ok(None) } else { Err(self.refused(&slot, key, e)) };
            }
        };
        if slot.current().is_some_and(|r| r.pointer == pointer) || slot.is_refused(&pointer) {
            return Ok(None);
        }
        match LoadedRound::load(&slot.store, name, &pointer).await {
            Ok(mut round) => {
                round.history = Arc::new(history_up_to(&slot, &round).await);
                let number = round.round();
                let previous = slot.current.swap(Some(Arc::new(round)));
                self.metrics.round_swapped(name, number);
                tracing::info!(pipeline = name, round = number, previous = previous.map(|r| r.round()), "serving round");
                Ok(Some(number))
            }
            Err(e) => Err(self.refused(&slot, pointer, e)),
        }
    }

    /// Records and logs a round that did not load.
    fn refused(&self, slot: &PipelineModels, pointer: LatestPointer, e: ApiError) -> ApiError {
        // Store errors are worth retrying at the next poll; a bad round is logged once here and
        // not tried again for a while.
        if matches!(e, ApiError::BadRound { .. }) {
            self.metrics.round_refused(&slot.name);
            tracing::error!(pipeline = slot.name, error = %e, "refused round; still serving the previous one");
            if let Ok(mut refused) = slot.refused.lock() {
                *refused = Some((pointer, Instant::now()));
            }
        }
        e
    }

    /// Refreshes every `interval` until `shutdown`; errors are logged and retried next time.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        loop {
            match self.refresh().await {
                Ok(r) => {
                    // A bad round was logged where it was refused; anything else is worth a warning.
                    for (pipeline, e) in r.failed.iter().filter(|(_, e)| !matches!(e, ApiError::BadRound { .. })) {
                        tracing::warn!(pipeline, error = %e, "cannot read the pipeline's models; trying again");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list the model store; trying again"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}

/// Summaries of every round folder of the pipeline up to `round`'s, oldest first; unreadable
/// ones are skipped.
async fn history_up_to(slot: &PipelineModels, round: &LoadedRound) -> Vec<RoundSummary> {
    let listed = match slot.store.store().list_with_delimiter(None).await {
        Ok(listed) => listed,
        Err(e) => {
            tracing::warn!(pipeline = slot.name, error = %e, "cannot list the pipeline's rounds; showing the served round only");
            return vec![round.summary()];
        }
    };
    let mut folders: Vec<(u64, String)> = listed
        .common_prefixes
        .iter()
        .filter_map(|p| {
            let name = p.as_ref().trim_end_matches('/');
            name.strip_prefix("round-").and_then(|n| n.parse().ok()).map(|n: u64| (n, name.to_string()))
        })
        .filter(|(n, _)| *n < round.round())
        .collect();
    folders.sort();
    let mut known = slot.history.lock().map(|h| h.clone()).unwrap_or_default();
    for (n, folder) in folders {
        if known.contains_key(&n) {
            continue;
        }
        let path = Path::from(format!("{folder}/{MODEL_FILE}"));
        match slot.store.get(&path).await.map(|b| serde_json::from_slice::<ModelArtifact>(&b)) {
            Ok(Ok(a)) => {
                known.insert(n, summary(&a, &folder));
            }
            Ok(Err(e)) => tracing::warn!(pipeline = slot.name, round = n, error = %e, "skipping an unreadable round in the history"),
            Err(e) => tracing::warn!(pipeline = slot.name, round = n, error = %e, "skipping an unreadable round in the history"),
        }
    }
    known.insert(round.round(), round.summary());
    if let Ok(mut h) = slot.history.lock() {
        h.clone_from(&known);
    }
    known.into_values().filter(|s| s.round <= round.round()).collect()
}
