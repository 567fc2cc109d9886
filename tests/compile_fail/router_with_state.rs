// A router whose state is not given yet (`Router<AppState>`, not `Router<()>`).
#[derive(Clone)]
struct AppState;

fn main() {
    let listeners = handover::Listeners::default();
    let app: axum::Router<AppState> =
        axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
    let _server = handover::serve(listeners, app);
}
