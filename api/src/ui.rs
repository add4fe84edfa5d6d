//! The web page at `/`: one HTML file with a little plain JavaScript that calls the same public
//! endpoints as any client (`/models`, `/status`, `/predict`) and draws its charts as SVG.
//! It is compiled into the binary, so `cargo build` is all it takes.

use axum::response::Html;

/// The page.
pub async fn page() -> Html<&'static str> {
    Html(include_str!("ui/index.html"))
}
