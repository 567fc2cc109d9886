// axum's `into_make_service()` where handover wants the router itself.
fn main() {
    let listeners = handover::Listeners::default();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
    let _server = handover::serve(listeners, app.into_make_service());
}
