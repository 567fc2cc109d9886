// What every axum user who needs the peer address writes first: handover puts
// `ConnectInfo<SocketAddr>` in every request itself (the `axum` feature). (Through `serve`:
// rustc names `Server::service` with or without its crate depending on which features are on,
// which a snapshot cannot follow; the bound is the same.)
use std::net::SocketAddr;

fn main() {
    let listeners = handover::Listeners::default();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
    let _server = handover::serve(
        listeners,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    );
}
