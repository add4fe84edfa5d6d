//! Ballista's scheduler as lensflow runs it: `lensflow scheduler`.
//!
//! One module: [`SchedulerOptions`] (validated settings) → [`run`], which builds Ballista's
//! `SchedulerConfig` with lensflow's session setup (S3 support from the standard `AWS_*`
//! variables, so adaptive planning can list lake files; lensflow's SQL dialect, so it plans
//! with the functions the client and executors have) and serves until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use ballista_core::object_store::{runtime_env_with_s3_support, session_config_with_s3_support};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::start_server;
use tokio_util::sync::CancellationToken;

/// What can stop the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The settings cannot work.
    #[error("invalid scheduler setting --{option}: {reason}")]
    Config {
        /// The flag.
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// Ballista failed to start or stopped with an error.
    #[error("ballista scheduler on {bind}: {source}")]
    Ballista {
        /// The address it was serving on.
        bind: SocketAddr,
        /// What Ballista said.
        source: ballista_core::error::BallistaError,
    },
}

/// Settings of a scheduler process.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Address to serve gRPC and the REST API on.
    pub bind: SocketAddr,
    /// Host name executors and clients reach it by (a compose service name, say).
    pub external_host: String,
    /// Seconds without a heartbeat after which an executor counts as lost and its tasks are
    /// run elsewhere (Ballista's default of 180 s stalls a round for minutes).
    pub executor_timeout_secs: u64,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions { bind: SocketAddr::from(([0, 0, 0, 0], 50050)), external_host: "localhost".into(), executor_timeout_secs: 20 }
    }
}

/// A session of the scheduler: the lake's object stores and lensflow's SQL dialect as a cluster
/// runs it, the functions the executors resolve (an aggregate's partial state is laid out by
/// the implementation that plans it, so planner and executors must agree).
fn session_state(config: datafusion::prelude::SessionConfig) -> datafusion::common::Result<datafusion::execution::SessionState> {
    let runtime = runtime_env_with_s3_support(&config)?;
    let builder = datafusion::execution::SessionStateBuilder::new().with_runtime_env(runtime).with_config(config);
    Ok(lensflow_core::dialect::decoding_state(builder).build())
}

/// Runs the scheduler until `shutdown` fires.
pub async fn run(opts: SchedulerOptions, shutdown: CancellationToken) -> Result<(), SchedulerError> {
    if opts.external_host.is_empty() {
        return Err(SchedulerError::Config { option: "external-host", reason: "is empty".into() });
    }
    if opts.executor_timeout_secs < 10 {
        return Err(SchedulerError::Config {
            option: "executor-timeout",
            reason: format!("{}s is shorter than two executor heartbeats (5 s each)", opts.executor_timeout_secs),
        });
    }
    let config = SchedulerConfig {
        bind_host: opts.bind.ip().to_string(),
        bind_port: opts.bind.port(),
        external_host: opts.external_host.clone(),
        override_config_producer: Some(Arc::new(session_config_with_s3_support)),
        override_session_builder: Some(Arc::new(session_state)),
        executor_timeout_seconds: opts.executor_timeout_secs,
        expire_dead_executor_interval_seconds: 5,
        ..Default::default()
    };
    let bind = opts.bind;
    let err = |source| SchedulerError::Ballista { bind, source };
    let cluster = BallistaCluster::new_from_config(&config).await.map_err(err)?;
    tracing::info!(%bind, external_host = opts.external_host, "ballista scheduler starting");
    tokio::select! {
        result = start_server(cluster, bind, Arc::new(config)) => result.map_err(err),
        _ = shutdown.cancelled() => {
            tracing::info!("scheduler stopping");
            Ok(())
        }
    }
}
