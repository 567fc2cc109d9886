//! The application's service as hyper calls it, and its response body: where the serve path
//! learns that a request began and that its response is done.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};

use super::control::{Control, Directive, Phase};
use crate::conn_info::ConnectionInfo;
use crate::error::BoxError;
use crate::registry::Shared;

/// A service handover serves: the bounds, written once. Implemented for every type that has
/// them (see [`crate::HttpService`], the public face of the same bounds).
pub(crate) trait AppService:
    tower_service::Service<
        Request<Incoming>,
        Response = Response<Self::Body>,
        Error: Into<BoxError>,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
    /// The response body.
    type Body: Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> AppService for S
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Body = B;
}

/// The application's service, as hyper calls it: marks the connection busy, puts the
/// connection's information in the request, and gives HTTP/1 responses `Connection: close`
/// when the server asks for it.
pub(crate) struct DrainAware<S> {
    // Boxed so that this type is `Unpin` whatever the service is: hyper's connection must be
    // `Unpin` to be taken apart (`into_parts` takes it by value).
    inner: Box<S>,
    control: Arc<Control>,
    shared: Arc<Shared>,
    /// What every request of the connection carries. `None`: nothing
    /// (`Server::connection_info(false)`).
    extensions: Option<ConnExtensions>,
}

impl<S> DrainAware<S> {
    pub(crate) fn new(
        service: S,
        control: Arc<Control>,
        info: &ConnectionInfo,
        shared: Arc<Shared>,
    ) -> DrainAware<S> {
        DrainAware {
            inner: Box::new(service),
            control,
            extensions: shared
                .connection_info
                .then(|| ConnExtensions::new(info.clone())),
            shared,
        }
    }
}

/// What every request of a connection carries in its extensions: its [`ConnectionInfo`] (and,
/// with the `axum` feature, axum's `ConnectInfo`).
///
/// Either way a request's extensions cost three allocations (the map, its table, the value).
/// Inserting the entries costs about 30 instructions more per request than cloning a map made
/// once, but making that map costs as much as a dozen inserts: so a connection's first
/// [`ConnExtensions::TEMPLATE_AFTER`] requests get the entries inserted, and only a connection
/// that goes on (keep-alive) makes the map and clones it from then on. A connection per request
/// (`Connection: close`) never pays for a map it would use once.
struct ConnExtensions {
    info: ConnectionInfo,
    /// Requests served so far, up to [`ConnExtensions::TEMPLATE_AFTER`].
    served: std::cell::Cell<u32>,
    template: std::cell::OnceCell<hyper::http::Extensions>,
}

impl ConnExtensions {
    const TEMPLATE_AFTER: u32 = 16;

    fn new(info: ConnectionInfo) -> ConnExtensions {
        ConnExtensions {
            info,
            served: std::cell::Cell::new(0),
            template: std::cell::OnceCell::new(),
        }
    }

    #[inline]
    fn put_in(&self, extensions: &mut hyper::http::Extensions) {
        match self.template.get() {
            Some(template) => extensions.extend(template.clone()),
            None => self.put_in_first(extensions),
        }
    }

    #[cold]
    fn put_in_first(&self, extensions: &mut hyper::http::Extensions) {
        let served = self.served.get();
        if served < Self::TEMPLATE_AFTER {
            self.served.set(served + 1);
            return self.insert(extensions);
        }
        let mut template = hyper::http::Extensions::new();
        self.insert(&mut template);
        extensions.extend(self.template.get_or_init(|| template).clone());
    }

    fn insert(&self, extensions: &mut hyper::http::Extensions) {
        #[cfg(feature = "axum")]
        if let Some(addr) = self.info.peer_addr() {
            extensions.insert(axum::extract::ConnectInfo(addr));
        }
        extensions.insert(self.info.clone());
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for DrainAware<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = BoxError;
    type Future = DrainAwareFuture<Call<S>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let http1 = req.version() < Version::HTTP_2;
        let done = if http1 {
            self.control.request_started();
            // A body not known to be over yet: hyper may still be reading it after the
            // response, and until it has, the connection is not idle (or its rest would be
            // read as a request).
            BodyDone {
                control: Arc::clone(&self.control),
                kind: match req.body().is_end_stream() {
                    true => Done::H1,
                    false => Done::H1BodyPending,
                },
            }
        } else {
            self.control.stream_opened();
            BodyDone {
                control: Arc::clone(&self.control),
                kind: Done::H2,
            }
        };
        if self.control.directives().contains(Directive::Stopping) {
            self.shared.count_request_while_stopping();
        }
        if let Some(extensions) = &self.extensions {
            extensions.put_in(req.extensions_mut());
        }
        DrainAwareFuture {
            connect: req.method() == Method::CONNECT,
            inner: Call::new((*self.inner).clone(), req),
            done: Some(done),
        }
    }
}

pin_project_lite::pin_project! {
    /// A call of a tower service: `poll_ready`, then `call`, as tower's contract asks.
    ///
    /// Most services are always ready (a router, a `service_fn`): their readiness is asked
    /// at once, with a waker that does nothing, and the call made on the spot, so that the
    /// request is not stored and moved in a future of ours first (`tower::util::Oneshot` moves
    /// it several times per request). A service that is not ready is asked again from this
    /// future, with the task's waker (the state for that rare case is boxed, so it does not
    /// make every call's future larger, or its drop longer).
    #[project = CallProj]
    pub(crate) enum Call<S>
    where
        S: tower_service::Service<Request<Incoming>>,
    {
        Called { #[pin] fut: S::Future },
        Waiting { rest: Option<Box<Waiting<S>>> },
    }
}

/// A call not made yet: the service was not ready, or its readiness failed.
// Always boxed (in `Call::Waiting`): the variants' sizes cost nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Waiting<S> {
    NotReady(S, Request<Incoming>),
    Failed(BoxError),
}

/// The call of a service that was not ready once it is (or its failure); `rest` is left empty.
#[cold]
fn poll_waiting<S>(
    rest: &mut Option<Box<Waiting<S>>>,
    cx: &mut Context<'_>,
) -> Poll<Result<S::Future, BoxError>>
where
    S: tower_service::Service<Request<Incoming>>,
    S::Error: Into<BoxError>,
{
    if let Some(Waiting::NotReady(svc, _)) = rest.as_deref_mut()
        && let Err(e) = ready!(svc.poll_ready(cx))
    {
        *rest = None;
        return Poll::Ready(Err(e.into()));
    }
    match rest.take().map(|w| *w) {
        Some(Waiting::NotReady(mut svc, req)) => Poll::Ready(Ok(svc.call(req))),
        Some(Waiting::Failed(e)) => Poll::Ready(Err(e)),
        // Polled after it failed.
        None => Poll::Pending,
    }
}

impl<S> Call<S>
where
    S: tower_service::Service<Request<Incoming>>,
    S::Error: Into<BoxError>,
{
    fn new(mut svc: S, req: Request<Incoming>) -> Call<S> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match svc.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => Call::Called { fut: svc.call(req) },
            Poll::Ready(Err(e)) => Call::Waiting {
                rest: Some(Box::new(Waiting::Failed(e.into()))),
            },
            Poll::Pending => Call::Waiting {
                rest: Some(Box::new(Waiting::NotReady(svc, req))),
            },
        }
    }
}

/// Why a [`Call`] failed: the service's own error is kept as it is (and converted into a
/// [`BoxError`] only when there is one), so that a response is not moved into another `Result`
/// on its way out.
pub(crate) enum CallError<E> {
    /// The service's future failed.
    Service(E),
    /// The service's `poll_ready` failed.
    NotReady(BoxError),
}

impl<E: Into<BoxError>> From<CallError<E>> for BoxError {
    fn from(e: CallError<E>) -> BoxError {
        match e {
            CallError::Service(e) => e.into(),
            CallError::NotReady(e) => e,
        }
    }
}

impl<S> Future for Call<S>
where
    S: tower_service::Service<Request<Incoming>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, CallError<S::Error>>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                CallProj::Called { fut } => return fut.poll(cx).map_err(CallError::Service),
                CallProj::Waiting { rest } => match ready!(poll_waiting(rest, cx)) {
                    Ok(fut) => self.set(Call::Called { fut }),
                    Err(e) => return Poll::Ready(Err(CallError::NotReady(e))),
                },
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`DrainAware`].
    pub(crate) struct DrainAwareFuture<F> {
        #[pin]
        inner: F,
        // Taken into the response body; dropped with this future if there is none.
        done: Option<BodyDone>,
        connect: bool,
    }
}

impl<F, B, E> Future for DrainAwareFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<TrackedBody<B>>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match ready!(this.inner.poll(cx)) {
            Ok(response) => response,
            Err(e) => {
                // hyper closes the connection on a service error; no phase to keep.
                return Poll::Ready(Err(e.into()));
            }
        };
        let done = this.done.take();
        if let Some(BodyDone {
            control,
            kind: Done::H1 | Done::H1BodyPending,
        }) = &done
        {
            // Not on an upgrade (101, or a CONNECT tunnel): `Connection: close` there would
            // contradict `Connection: upgrade`, and the client must reject it (RFC 6455 4.1).
            // Upgraded connections are tracked anyway and cut at the deadline.
            let upgrade = response.status() == StatusCode::SWITCHING_PROTOCOLS
                || (*this.connect && response.status().is_success());
            if upgrade {
                control.set_phase(Phase::Upgraded);
            } else if control.directives().contains(Directive::CloseResponses) {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
        }
        Poll::Ready(Ok(response.map(|inner| TrackedBody { inner, done })))
    }
}

pin_project_lite::pin_project! {
    /// A response body; marks the connection idle when hyper is done with it.
    pub(crate) struct TrackedBody<B> {
        #[pin]
        inner: B,
        done: Option<BodyDone>,
    }
}

/// Reports a response done when dropped (hyper drops a response body once it has written it,
/// or when the connection ends; the response future drops it if there is no response).
pub(crate) struct BodyDone {
    control: Arc<Control>,
    kind: Done,
}

/// What a [`BodyDone`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    /// HTTP/1: idle from now on.
    H1,
    /// HTTP/1, the request's body may still be arriving: idle once hyper has read it.
    H1BodyPending,
    /// HTTP/2: one stream less.
    H2,
}

impl Drop for BodyDone {
    fn drop(&mut self) {
        match self.kind {
            Done::H1 => self.control.response_done(false),
            Done::H1BodyPending => self.control.response_done(true),
            Done::H2 => self.control.stream_closed(),
        }
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
