//! The one shape of an ops error answer, `{"error": "..."}` with its status, and the mapping
//! of control's errors onto statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::cluster::WriteError;
use crate::control::ControlError;

/// An error answer: status and a message for `{"error": ...}`.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        match e {
            ControlError::UnknownRoute(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            ControlError::Conflict(_) => ApiError(StatusCode::CONFLICT, e.to_string()),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> ApiError {
        match e {
            WriteError::Refused(c) => c.into(),
            WriteError::Unavailable(_) => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
}
