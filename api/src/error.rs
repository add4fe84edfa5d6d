//! The API's one error type: what the client did wrong (4xx, told in full) or what went wrong
//! here (5xx, told in the log, summarised to the client).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lensflow_core::predict::{ErrorBody, FieldError};

/// Everything that can go wrong in the API, from a bad request to a round that will not load.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON at all.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// The JSON is well formed but some fields are wrong; every problem found is listed.
    #[error("{}: {}", .0[0].field, .0[0].message)]
    Invalid(Vec<FieldError>),
    /// The body is over the size limit.
    #[error("request body over the {limit} byte limit")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// No round of the pipeline is loaded yet.
    #[error("no model round of pipeline `{0}` is loaded yet: train one with `lensflow train --pipeline {0}` (the server picks it up on its own)")]
    NotReady(String),
    /// The model store holds no pipeline of this name.
    #[error("no pipeline `{name}` in the model store (it has: {known})")]
    UnknownPipeline {
        /// The name asked for.
        name: String,
        /// The pipelines there are, for the message.
        known: String,
    },
    /// A round in the model store is unusable; the server keeps serving the previous one.
    #[error("round {round} ({path}): {reason}")]
    BadRound {
        /// The round number `LATEST` named.
        round: u64,
        /// The file or folder at fault.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading the model store or the lake failed.
    #[error(transparent)]
    Store(#[from] lensflow_core::StoreError),
    /// Evaluating the round's feature expressions failed (a bug or a definition serving
    /// cannot compute; logged, summarised to the client).
    #[error("pipeline {pipeline}: {reason}")]
    Evaluate {
        /// The pipeline.
        pipeline: String,
        /// What failed.
        reason: String,
    },
    /// Binding or serving the socket failed.
    #[error("serving on {addr}: {source}")]
    Serve {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl ApiError {
    /// A single field problem.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::Invalid(vec![FieldError { field: field.into(), message: message.into() }])
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UnknownPipeline { .. } => StatusCode::NOT_FOUND,
            ApiError::BadRound { .. } | ApiError::Store(_) | ApiError::Serve { .. } | ApiError::Evaluate { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body: client errors in full, server errors without internals.
    pub fn body(&self) -> ErrorBody {
        match self {
            ApiError::Invalid(errors) => ErrorBody { error: self.to_string(), field: errors.first().map(|e| e.field.clone()), errors: errors.clone() },
            ApiError::MalformedJson(_) | ApiError::TooLarge { .. } => ErrorBody { error: self.to_string(), field: Some("body".into()), errors: vec![] },
            ApiError::NotReady(_) => ErrorBody { error: self.to_string(), field: None, errors: vec![] },
            ApiError::UnknownPipeline { .. } => ErrorBody { error: self.to_string(), field: Some("pipeline".into()), errors: vec![] },
            ApiError::BadRound { .. } | ApiError::Store(_) | ApiError::Serve { .. } | ApiError::Evaluate { .. } => {
                ErrorBody { error: "internal error (details in the server log)".into(), field: None, errors: vec![] }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // Not being ready yet is a state, not a failure worth an error line per request.
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "request failed");
        }
        (status, axum::Json(self.body())).into_response()
    }
}
