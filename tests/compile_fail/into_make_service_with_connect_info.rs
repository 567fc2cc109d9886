// What every axum user who needs the peer address writes first: handover puts
// `ConnectInfo<SocketAddr>` in every request itself (the `axum` feature).
use std::net::SocketAddr;

fn main() {
    let listeners = handover::Listeners::default();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
    let _server = handover::Server::new(listeners)
        .service("web", app.into_make_service_with_connect_info::<SocketAddr>());
}
