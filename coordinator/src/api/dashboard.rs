//! The web dashboard: static pages embedded in the binary.

use axum::Router;

pub fn routes() -> Router {
    Router::new()
}
