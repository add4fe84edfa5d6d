//! Ballista's executor as lensflow runs it: `lensflow executor`.
//!
//! One module: [`ExecutorOptions`] → [`run`], which builds Ballista's `ExecutorProcessConfig`
//! with lensflow's session and runtime setup (the lake's object stores: local folders, and S3
//! from the standard `AWS_*` variables; lensflow's SQL dialect as its function registry) and
//! works until shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ballista_core::object_store::{runtime_env_with_s3_support, session_config_with_s3_support};
use ballista_core::registry::BallistaFunctionRegistry;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use tokio_util::sync::CancellationToken;

/// What can stop the executor.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The settings cannot work.
    #[error("invalid executor setting --{option}: {reason}")]
    Config {
        /// The flag.
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// Ballista failed to start or stopped with an error.
    #[error("ballista executor (scheduler {scheduler}): {source}")]
    Ballista {
        /// The scheduler it serves.
        scheduler: String,
        /// What Ballista said.
        source: ballista_core::error::BallistaError,
    },
}

/// Settings of an executor process.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The scheduler, `host:port`.
    pub scheduler: String,
    /// Address of the executor's Arrow Flight service (results and shuffle data).
    pub bind: SocketAddr,
    /// Port of its gRPC service.
    pub grpc_port: u16,
    /// Host name the scheduler and other executors reach it by (default: its IP as seen by the scheduler).
    pub external_host: Option<String>,
    /// Tasks run at once (0: one per core).
    pub concurrent_tasks: usize,
    /// Where shuffle files go (default: a temporary folder).
    pub work_dir: Option<PathBuf>,
    /// Seconds to keep trying to reach the scheduler at start.
    pub connect_timeout_secs: u16,
}

impl Default for ExecutorOptions {
    fn default() -> Self {
        ExecutorOptions {
            scheduler: "127.0.0.1:50050".into(),
            bind: SocketAddr::from(([0, 0, 0, 0], 50051)),
            grpc_port: 50052,
            external_host: None,
            concurrent_tasks: 0,
            work_dir: None,
            connect_timeout_secs: 60,
        }
    }
}

/// The functions tasks resolve by name: lensflow's SQL dialect, as the client and the
/// scheduler plan with.
fn function_registry() -> BallistaFunctionRegistry {
    let state = lensflow_core::dialect::decoding_state(datafusion::execution::SessionStateBuilder::new()).build();
    BallistaFunctionRegistry {
        scalar_functions: state.scalar_functions().clone(),
        aggregate_functions: state.aggregate_functions().clone(),
        window_functions: state.window_functions().clone(),
        higher_order_functions: state.higher_order_functions().clone(),
    }
}

/// Runs the executor until `shutdown` fires.
pub async fn run(opts: ExecutorOptions, shutdown: CancellationToken) -> Result<(), ExecutorError> {
    let (host, port) = opts
        .scheduler
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| ExecutorError::Config { option: "scheduler", reason: format!("`{}` is not HOST:PORT", opts.scheduler) })?;
    if opts.grpc_port == opts.bind.port() {
        return Err(ExecutorError::Config { option: "grpc-port", reason: "must differ from the --bind port".into() });
    }
    let config = ExecutorProcessConfig {
        bind_host: opts.bind.ip().to_string(),
        port: opts.bind.port(),
        grpc_port: opts.grpc_port,
        external_host: opts.external_host.clone(),
        scheduler_host: host,
        scheduler_port: port,
        scheduler_connect_timeout_seconds: opts.connect_timeout_secs,
        vcores: opts.concurrent_tasks,
        work_dir: opts.work_dir.as_ref().map(|p| p.display().to_string()),
        override_config_producer: Some(Arc::new(session_config_with_s3_support)),
        override_runtime_producer: Some(Arc::new(runtime_env_with_s3_support)),
        override_function_registry: Some(Arc::new(function_registry())),
        // Frequent heartbeats let the scheduler notice a lost executor in seconds.
        executor_heartbeat_interval_seconds: 5,
        ..Default::default()
    };
    tracing::info!(scheduler = opts.scheduler, bind = %opts.bind, "ballista executor starting");
    let scheduler = opts.scheduler.clone();
    tokio::select! {
        result = start_executor_process(Arc::new(config)) => result.map_err(|source| ExecutorError::Ballista { scheduler, source }),
        _ = shutdown.cancelled() => {
            tracing::info!("executor stopping");
            Ok(())
        }
    }
}
