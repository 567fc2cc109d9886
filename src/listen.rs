//! Acquire listeners: inherited through the `LISTEN_FDS` protocol, or bound.
//!
//! # The protocol, and where handover departs from `sd_listen_fds(3)`
//! - `LISTEN_FDS=N`: the fds `3 .. 3+N` are listening sockets handed to us.
//! - `LISTEN_PID`: if set, the variables are for that pid only; if it is not ours they are
//!   ignored (they were meant for a parent that did not clear them). If it is **unset** the fds
//!   are accepted, as the `listenfd` crate does, so that `systemfd --no-pid` works; systemd
//!   itself always sets it.
//! - `LISTEN_FDNAMES=a:b:...`: one name per fd (systemd's `FileDescriptorName=`). Unset means
//!   every fd is named `unknown`, as in systemd.
//! - `LISTEN_FDS_FIRST_FD`: an extension of `systemfd`; the first fd if not 3.
//!
//! Every fd in the range is set close-on-exec before anything else, so none leaks into
//! programs the application starts, and each one is checked (open, a socket, `SOCK_STREAM`,
//! listening, family INET/INET6/UNIX) before it is used. A malformed variable or a wrong fd is
//! an [`Error`] naming the variable or fd and what was expected; nothing panics.
//!
//! The `listenfd` crate reads the same variables, but it ignores `LISTEN_FDNAMES`, removes the
//! variables even when other threads exist, and does not check that a socket is listening;
//! this module is the small part of it handover needs, done to those rules.

use std::ffi::OsStr;
use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Mutex;

use crate::error::{Error, Inner};
use crate::startup;
use crate::sys::{self, StreamFamily};

/// One listening socket: TCP (IPv4 or IPv6) or Unix stream.
///
/// A listener knows where it came from ([`Listener::origin`]) and its name (the
/// `LISTEN_FDNAMES` entry, or the address it was bound to), which a restart passes on to the
/// new process in `LISTEN_FDNAMES`.
pub struct Listener {
    pub(crate) socket: Socket,
    name: String,
    origin: Origin,
    /// No process outside this service's handover processes holds the socket: bound by one
    /// of them, and never given to a service manager's fd store. Its door may be shut when
    /// the service stops (see `accept`).
    exclusive: bool,
}

pub(crate) enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Where a [`Listener`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Origin {
    /// Inherited through `LISTEN_FDS` (from systemd, systemfd, or a handover parent) at this fd.
    Inherited {
        /// The fd number it was inherited at.
        fd: RawFd,
    },
    /// Bound by this process.
    Bound,
}

impl Listener {
    /// The name of the listener: its `LISTEN_FDNAMES` entry when inherited (`unknown` if the
    /// manager gave none), the name given to [`Listeners::take_or_bind`], or else the address
    /// it was bound to, with `:` (which the protocol uses as separator) written as `_`:
    /// `127.0.0.1_8877`. Services are chosen by it ([`crate::Server::service`]), and a restart
    /// passes it on in `LISTEN_FDNAMES`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the listener came from.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Renames the listener; the name is what a restart passes on in `LISTEN_FDNAMES`, and
    /// the `FDNAME=` of [`crate::Server::fd_store`]. Characters systemd does not allow in a
    /// name (`:`, control characters, non-ASCII) are replaced by `_`; at most 255 are kept.
    pub fn with_name(mut self, name: impl Into<String>) -> Listener {
        self.name = fd_name(&name.into());
        self
    }

    /// The local address, as `http://IP:PORT` or `unix:PATH`, for logs and `STATUS=`.
    pub fn url(&self) -> String {
        match &self.socket {
            Socket::Tcp(l) => match l.local_addr() {
                Ok(addr) => format!("http://{addr}"),
                Err(_) => "http://?".to_string(),
            },
            Socket::Unix(l) => match l.local_addr() {
                Ok(addr) => match addr.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed)".to_string(),
                },
                Err(_) => "unix:?".to_string(),
            },
        }
    }

    /// Whether only this service's handover processes hold the socket (see the field).
    pub(crate) fn is_exclusive(&self) -> bool {
        self.exclusive
    }

    /// Someone else may hold the socket too (the service manager's fd store, whoever gave it
    /// to the application).
    pub(crate) fn share(&mut self) {
        self.exclusive = false;
    }

    /// The local TCP address, if this is a TCP listener.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.socket {
            Socket::Tcp(l) => l.local_addr().ok(),
            Socket::Unix(_) => None,
        }
    }

    fn from_tcp(listener: TcpListener, origin: Origin) -> Result<Listener, Error> {
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("could not make a TCP listener non-blocking", e))?;
        let name = match listener.local_addr() {
            Ok(addr) => fd_name(&addr.to_string()),
            Err(_) => "tcp".to_string(),
        };
        Ok(Listener {
            socket: Socket::Tcp(listener),
            name,
            origin,
            exclusive: origin == Origin::Bound,
        })
    }

    fn from_unix(listener: UnixListener, origin: Origin) -> Result<Listener, Error> {
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("could not make a Unix listener non-blocking", e))?;
        let name = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| fd_name(&p.display().to_string())))
            .unwrap_or_else(|| "unix".to_string());
        Ok(Listener {
            socket: Socket::Unix(listener),
            name,
            origin,
            exclusive: origin == Origin::Bound,
        })
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.socket {
            Socket::Tcp(l) => l.as_fd(),
            Socket::Unix(l) => l.as_fd(),
        }
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("url", &self.url())
            .field("name", &self.name)
            .field("origin", &self.origin)
            .field("fd", &self.as_fd().as_raw_fd())
            .finish()
    }
}

impl TryFrom<TcpListener> for Listener {
    type Error = Error;
    /// Wraps a listener the application bound itself (made non-blocking here). handover does
    /// not know who else holds it (a socket manager the application took it from, worker
    /// processes sharing it), so it never puts anything on the socket that would outlive this
    /// process (no door when it stops: see [`crate::Server`]'s shutdown).
    fn try_from(listener: TcpListener) -> Result<Listener, Error> {
        let mut listener = Listener::from_tcp(listener, Origin::Bound)?;
        listener.share();
        Ok(listener)
    }
}

impl TryFrom<UnixListener> for Listener {
    type Error = Error;
    /// Wraps a listener the application bound itself (made non-blocking here); as for TCP,
    /// handover does not presume it is the only holder.
    fn try_from(listener: UnixListener) -> Result<Listener, Error> {
        let mut listener = Listener::from_unix(listener, Origin::Bound)?;
        listener.share();
        Ok(listener)
    }
}

/// The set of listeners a server serves, and a restart hands over.
///
/// # Example
/// ```no_run
/// // Before the tokio runtime starts, so the LISTEN_* variables can be removed safely.
/// let listeners = handover::Listeners::from_env_or_bind("127.0.0.1:8877".parse().unwrap())?;
/// for l in listeners.iter() {
///     println!("listening on {} ({:?})", l.url(), l.origin());
/// }
/// # Ok::<(), handover::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct Listeners {
    list: Vec<Listener>,
}

impl Listeners {
    /// Takes the listeners this process inherited through `LISTEN_FDS` (empty if none).
    ///
    /// Call it first thing in `main`, before a tokio runtime (or any thread) exists: then the
    /// `LISTEN_*`, `NOTIFY_SOCKET` and `WATCHDOG_*` variables are also removed from the
    /// environment, so programs the application starts do not misread them. Called later it
    /// still works, but leaves the environment as it is (removing variables while other
    /// threads run is unsound).
    ///
    /// The inherited fds can be taken once per process; later calls return an empty set.
    /// This call takes ownership of the fds `LISTEN_FDS` names, as the protocol says: call it
    /// before anything in the process opens files, so those numbers cannot belong to anything
    /// else (with `LISTEN_PID` unset, as under `systemfd --no-pid`, that is all that vouches
    /// for them).
    ///
    /// # Errors
    /// A malformed `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES` or `LISTEN_FDS_FIRST_FD`, or an
    /// inherited fd that is not a listening stream socket.
    pub fn from_env() -> Result<Listeners, Error> {
        let result = Listeners::adopt_env();
        if let Err(e) = &result {
            // A restarted process that cannot adopt its listeners says why to its parent.
            crate::reason::report(e);
        }
        result
    }

    fn adopt_env() -> Result<Listeners, Error> {
        let startup = startup::get();
        if !startup.take_fds() {
            return Ok(Listeners::default());
        }
        let Some(fds) = parse_env(&EnvValues {
            fds: startup.listen_fds.as_deref(),
            pid: startup.listen_pid.as_deref(),
            names: startup.listen_fdnames.as_deref(),
            first_fd: startup.listen_fds_first_fd.as_deref(),
            our_pid: startup.pid,
        })?
        else {
            return Ok(Listeners::default());
        };
        // Close-on-exec on the whole range first, so that an error on one fd leaks none.
        for (fd, _) in &fds {
            let _ = sys::set_cloexec_raw(*fd);
        }
        let mut list = Vec::with_capacity(fds.len());
        for (fd, name) in fds {
            if name == startup::TICKETS_FDNAME {
                // Not a listener: the TLS session ticket keys, back from the fd store.
                restore_tickets(fd);
                continue;
            }
            let (owned, family) = sys::adopt_inherited(fd).map_err(|problem| {
                Error::new(Inner::BadFd {
                    fd,
                    name: name.clone(),
                    problem,
                })
            })?;
            let origin = Origin::Inherited { fd };
            let mut listener = match family {
                StreamFamily::Inet => Listener::from_tcp(TcpListener::from(owned), origin)?,
                StreamFamily::Unix => Listener::from_unix(UnixListener::from(owned), origin)?,
            };
            listener.exclusive = startup.exclusive_fds.contains(&fd);
            tracing::info!(fd, name = %name, url = %listener.url(), "inherited listener");
            list.push(listener.with_name(name));
        }
        untaken::inherited(&list);
        Ok(Listeners { list })
    }

    /// Binds a TCP listener on `addr`.
    ///
    /// # Errors
    /// The error names the address and the reason (for example "Address already in use").
    pub fn bind(addr: SocketAddr) -> Result<Listeners, Error> {
        // Capture start-up state now, in case this is the first handover call.
        let _ = startup::get();
        let listener = TcpListener::bind(addr).map_err(|source| {
            Error::new(Inner::Bind {
                addr: addr.to_string(),
                source,
                hint: None,
            })
        })?;
        let listener = Listener::from_tcp(listener, Origin::Bound)?;
        tracing::info!(url = %listener.url(), "bound listener");
        Ok(Listeners::from(listener))
    }

    /// Binds a Unix stream listener at `path`. A socket file left there by a process that is
    /// gone (nothing accepts on it) is removed first; a live one is an error, as is any other
    /// kind of file.
    ///
    /// # Errors
    /// The error names the path and the reason.
    pub fn bind_unix(path: impl AsRef<Path>) -> Result<Listeners, Error> {
        let _ = startup::get();
        let path = path.as_ref();
        remove_stale_socket(path);
        let listener = UnixListener::bind(path).map_err(|source| {
            Error::new(Inner::Bind {
                addr: format!("unix:{}", path.display()),
                source,
                hint: None,
            })
        })?;
        let listener = Listener::from_unix(listener, Origin::Bound)?;
        tracing::info!(url = %listener.url(), "bound listener");
        Ok(Listeners::from(listener))
    }

    /// The inherited listeners if there are any, otherwise a TCP listener bound on `addr`:
    /// the behaviour of the Go original's `ListenAndServe(addr)`, socket-activation aware.
    ///
    /// # Errors
    /// As [`Listeners::from_env`] and [`Listeners::bind`].
    pub fn from_env_or_bind(addr: SocketAddr) -> Result<Listeners, Error> {
        let inherited = Listeners::from_env()?;
        if inherited.is_empty() {
            Listeners::bind(addr)
        } else {
            Ok(inherited)
        }
    }

    /// The listener named `name` among the inherited ones, or else the inherited listener
    /// whose address is `addr` (a manager that gave it no name: `systemfd`, or
    /// `systemd-socket-activate` without `--fdname`), or else a TCP listener bound on `addr`;
    /// named `name` in every case. The set-up of an application with several listeners, which
    /// works the same under systemd (`FileDescriptorName=name`; without it systemd names the fd
    /// after its socket unit, `myapp.socket`), under `systemfd` and on its own.
    ///
    /// # Example
    /// ```no_run
    /// let mut listeners = handover::Listeners::from_env()?;
    /// let web = listeners.take_or_bind("web", "127.0.0.1:8080".parse().unwrap())?;
    /// let admin = listeners.take_or_bind("admin", "127.0.0.1:8081".parse().unwrap())?;
    /// assert_eq!((web.name(), admin.name()), ("web", "admin"));
    /// # Ok::<(), handover::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`Listeners::bind`]; an address in use while inherited listeners are left untaken
    /// says which (an inherited socket under another name, most likely).
    pub fn take_or_bind(&mut self, name: &str, addr: SocketAddr) -> Result<Listener, Error> {
        if let Some(l) = self.take(name) {
            return Ok(l);
        }
        if let Some(i) = self.list.iter().position(|l| l.local_addr() == Some(addr)) {
            return Ok(untaken::taken(self.list.remove(i)).with_name(name));
        }
        match Listeners::bind(addr) {
            Ok(mut bound) => Ok(bound.list.remove(0).with_name(name)),
            Err(e) => Err(self.explain(e, name)),
        }
    }

    /// The listener named `name` among the inherited ones, or else the inherited Unix listener
    /// at `path`, or else one bound at `path` (see [`Listeners::bind_unix`]: its directory must
    /// exist; under systemd, `RuntimeDirectory=`); named `name` in every case.
    ///
    /// # Errors
    /// As [`Listeners::bind_unix`].
    pub fn take_or_bind_unix(
        &mut self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<Listener, Error> {
        let path = path.as_ref();
        if let Some(l) = self.take(name) {
            return Ok(l);
        }
        let at_path = |l: &Listener| match &l.socket {
            Socket::Unix(u) => u
                .local_addr()
                .ok()
                .is_some_and(|a| a.as_pathname() == Some(path)),
            Socket::Tcp(_) => false,
        };
        if let Some(i) = self.list.iter().position(at_path) {
            return Ok(untaken::taken(self.list.remove(i)).with_name(name));
        }
        match Listeners::bind_unix(path) {
            Ok(mut bound) => Ok(bound.list.remove(0).with_name(name)),
            Err(e) => Err(self.explain(e, name)),
        }
    }

    /// A bind error, with the inherited listeners left untaken when the address was in use.
    fn explain(&self, e: Error, name: &str) -> Error {
        e.hint_if_in_use(|| {
            if self.list.is_empty() {
                return None;
            }
            let left: Vec<String> = self
                .list
                .iter()
                .map(|l| format!("{:?} ({})", l.name, l.url()))
                .collect();
            Some(format!(
                "no inherited listener is named {name:?}, and these are left untaken: {}. Name \
                 the socket {name:?} where it is made (FileDescriptorName= in the socket unit, \
                 systemd-socket-activate --fdname), or take it by its name",
                left.join(", ")
            ))
        })
    }

    /// Removes and returns the first listener named `name` (see [`Listener::name`]).
    pub fn take(&mut self, name: &str) -> Option<Listener> {
        let index = self.list.iter().position(|l| l.name == name)?;
        Some(untaken::taken(self.list.remove(index)))
    }

    /// Closes the listeners left in this set, with a warning that names each one (its fd, name
    /// and address): the way to say that inherited sockets this service does not serve may go.
    ///
    /// An inherited listener that is neither served nor closed this way (left in the set that
    /// [`Listeners::from_env`] returned, whether that set is dropped or kept) is an error when a
    /// [`crate::Server`] starts, before `READY=1`: the service manager passed a socket (under a
    /// name the code does not take, most likely) that nobody would accept on, and its clients
    /// would wait until they time out.
    ///
    /// # Example
    /// ```no_run
    /// let mut inherited = handover::Listeners::from_env()?;
    /// let web = inherited.take_or_bind("web", "127.0.0.1:8080".parse().unwrap())?;
    /// inherited.close_unused(); // anything else passed to this process: closed, with a warning
    /// # Ok::<(), handover::Error>(())
    /// ```
    pub fn close_unused(self) {
        for listener in self.list {
            let listener = untaken::taken(listener);
            match listener.origin {
                Origin::Inherited { fd } => tracing::warn!(
                    fd,
                    name = %listener.name(),
                    url = %listener.url(),
                    "inherited listener not served by this process; closing it"
                ),
                Origin::Bound => tracing::warn!(
                    name = %listener.name(),
                    url = %listener.url(),
                    "listener not served by this process; closing it"
                ),
            }
        }
    }

    /// Adds a listener.
    pub fn push(&mut self, listener: Listener) {
        self.list.push(listener);
    }

    /// The listeners, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Listener> {
        self.list.iter()
    }

    /// How many listeners there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The listeners, given to a server: inherited ones count as taken from here on.
    pub(crate) fn into_vec(self) -> Vec<Listener> {
        self.list.into_iter().map(untaken::taken).collect()
    }
}

impl From<Listener> for Listeners {
    fn from(listener: Listener) -> Listeners {
        Listeners {
            list: vec![listener],
        }
    }
}

impl From<Vec<Listener>> for Listeners {
    fn from(list: Vec<Listener>) -> Listeners {
        Listeners { list }
    }
}

impl<const N: usize> From<[Listener; N]> for Listeners {
    fn from(list: [Listener; N]) -> Listeners {
        Listeners { list: list.into() }
    }
}

impl FromIterator<Listener> for Listeners {
    fn from_iter<I: IntoIterator<Item = Listener>>(iter: I) -> Listeners {
        Listeners {
            list: iter.into_iter().collect(),
        }
    }
}

impl Extend<Listener> for Listeners {
    fn extend<I: IntoIterator<Item = Listener>>(&mut self, iter: I) {
        self.list.extend(iter);
    }
}

impl IntoIterator for Listeners {
    type Item = Listener;
    type IntoIter = std::vec::IntoIter<Listener>;
    /// The listeners, each now the caller's to serve or close: inherited ones count as taken.
    fn into_iter(self) -> Self::IntoIter {
        self.into_vec().into_iter()
    }
}

/// Removes `path` if it is a Unix socket file nobody accepts on (connecting is refused).
///
/// The probe connects without blocking: a live server whose backlog is full would make a
/// blocking connect wait until it accepts, which may be never. `EAGAIN` means exactly that
/// (alive, busy): the file is left alone and the bind fails with "address in use".
fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return;
    }
    let Ok(addr) = rustix::net::SocketAddrUnix::new(path) else {
        return;
    };
    let Ok(probe) = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
        None,
    ) else {
        return;
    };
    match rustix::net::connect(&probe, &addr) {
        Err(rustix::io::Errno::CONNREFUSED) => {
            tracing::info!(path = %path.display(), "removing a stale Unix socket file");
            let _ = std::fs::remove_file(path);
        }
        Err(rustix::io::Errno::AGAIN) => {
            tracing::debug!(path = %path.display(), "the Unix socket is alive (its backlog is full)");
        }
        _ => {}
    }
}

/// The TLS session ticket keys a previous process of the service put in the fd store
/// (`Server::fd_store` with a TLS listener), given back at `fd`: taken (feature `rustls`) or
/// closed.
fn restore_tickets(fd: RawFd) {
    match sys::adopt_inherited_file(fd) {
        #[cfg(feature = "rustls")]
        Ok(file) => crate::tickets::restore(file),
        #[cfg(not(feature = "rustls"))]
        Ok(file) => drop(file),
        Err(problem) => tracing::warn!(
            fd,
            "the fd store's {} fd {problem}; ignored",
            startup::TICKETS_FDNAME
        ),
    }
}

/// A name as systemd accepts it in `FileDescriptorName=`/`FDNAME=`: printable ASCII without
/// `:`, at most 255 characters.
pub(crate) fn fd_name(name: &str) -> String {
    name.chars()
        .take(255)
        .map(|c| {
            if c.is_ascii_graphic() && c != ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The raw values of the protocol variables, and our pid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EnvValues<'a> {
    pub(crate) fds: Option<&'a OsStr>,
    pub(crate) pid: Option<&'a OsStr>,
    pub(crate) names: Option<&'a OsStr>,
    pub(crate) first_fd: Option<&'a OsStr>,
    pub(crate) our_pid: u32,
}

/// Most fds the protocol may hand us; far above any real use, it bounds the work done on a
/// hostile value.
const MAX_LISTEN_FDS: u32 = 4096;

/// Reads the protocol variables. `Ok(None)`: nothing is meant for us. `Ok(Some(list))`: the fd
/// numbers and their names.
pub(crate) fn parse_env(env: &EnvValues<'_>) -> Result<Option<Vec<(RawFd, String)>>, Error> {
    let Some(fds_raw) = env.fds else {
        return Ok(None);
    };
    if let Some(pid_raw) = env.pid {
        let pid = parse_decimal(pid_raw).filter(|&p| p > 0).ok_or_else(|| {
            Error::bad_var("LISTEN_PID", pid_raw, "a process id: decimal digits, > 0")
        })?;
        if pid != env.our_pid {
            tracing::info!(
                listen_pid = pid,
                our_pid = env.our_pid,
                "LISTEN_PID is not our pid: the LISTEN_FDS fds are not meant for us; ignoring them"
            );
            return Ok(None);
        }
    }
    let count = parse_decimal(fds_raw)
        .filter(|&n| n <= MAX_LISTEN_FDS)
        .ok_or_else(|| {
            Error::bad_var(
                "LISTEN_FDS",
                fds_raw,
                "a count of fds: decimal digits, at most 4096",
            )
        })?;
    if count == 0 {
        // As sd_listen_fds(3): no fds, whatever LISTEN_FDNAMES says.
        if env.names.is_some_and(|n| !n.is_empty()) {
            tracing::warn!(
                names = ?env.names,
                "LISTEN_FDS=0 with a non-empty LISTEN_FDNAMES: no fds are inherited, the names are ignored"
            );
        }
        return Ok(None);
    }
    let first = match env.first_fd {
        None => 3,
        Some(raw) => parse_decimal(raw)
            .filter(|&f| (3..=65536).contains(&f))
            .ok_or_else(|| {
                Error::bad_var(
                    "LISTEN_FDS_FIRST_FD",
                    raw,
                    "an fd number from 3 (0-2 are stdio) to 65536",
                )
            })?,
    };
    let names: Vec<String> = match env.names {
        None => vec!["unknown".to_string(); count as usize],
        Some(raw) => {
            let text = raw.to_str().ok_or_else(|| {
                Error::bad_var("LISTEN_FDNAMES", raw, "colon-separated UTF-8 names")
            })?;
            let names: Vec<String> = text.split(':').map(str::to_string).collect();
            if names.len() != count as usize {
                return Err(Error::bad_var(
                    "LISTEN_FDNAMES",
                    raw,
                    "one colon-separated name per fd in LISTEN_FDS",
                ));
            }
            names
        }
    };
    // first <= 65536 and count <= 4096, so these fit in an i32.
    let fds = (0..count).map(|i| (first + i) as RawFd);
    Ok(Some(fds.zip(names).collect()))
}

/// Strict decimal: ASCII digits only (no sign, no space, no empty string), fitting in u32.
fn parse_decimal(raw: &OsStr) -> Option<u32> {
    let text = raw.to_str()?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Duplicates of the listeners' fds, with their names, for a hand-off: the restart owns its
/// copies, so nothing the server does meanwhile can close (or reuse) the fd numbers it passes.
/// A listener as a restart passes it on: a copy of its fd, its name, and whether it is
/// [exclusive](Listener::is_exclusive).
pub(crate) struct PassedListener {
    pub(crate) fd: OwnedFd,
    pub(crate) name: String,
    pub(crate) exclusive: bool,
}

pub(crate) fn dup_fds(listeners: &[Listener]) -> std::io::Result<Vec<PassedListener>> {
    listeners
        .iter()
        .map(|l| {
            Ok(PassedListener {
                fd: l.as_fd().try_clone_to_owned()?,
                name: l.name.clone(),
                exclusive: l.exclusive,
            })
        })
        .collect()
}

impl From<Socket> for OwnedFd {
    fn from(socket: Socket) -> OwnedFd {
        match socket {
            Socket::Tcp(l) => l.into(),
            Socket::Unix(l) => l.into(),
        }
    }
}

/// Inherited listeners not taken yet out of the set [`Listeners::from_env`] returned: an
/// inherited socket that no server serves and the application did not close is a start-up error
/// ([`Listeners::close_unused`]).
///
/// Kept per process, by fd, because the set may be dropped (closing the fd, a mistake just the
/// same: the socket was passed to be served) or kept alive next to the server. Taking a
/// listener out of the set, by name, by address, by iterating it, or by giving the set to a
/// server, removes it from here.
mod untaken {
    use super::{Error, Listener, Mutex, Origin, RawFd};

    /// fd, name, address of each inherited listener not yet taken.
    static UNTAKEN: Mutex<Vec<(RawFd, String, String)>> = Mutex::new(Vec::new());

    fn untaken() -> std::sync::MutexGuard<'static, Vec<(RawFd, String, String)>> {
        UNTAKEN.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `list` was just inherited.
    pub(super) fn inherited(list: &[Listener]) {
        let mut untaken = untaken();
        for l in list {
            if let Origin::Inherited { fd } = l.origin {
                untaken.push((fd, l.name.clone(), l.url()));
            }
        }
    }

    /// `listener` left the set `from_env` returned.
    pub(super) fn taken(listener: Listener) -> Listener {
        if let Origin::Inherited { fd } = listener.origin {
            untaken().retain(|(f, _, _)| *f != fd);
        }
        listener
    }

    /// An error naming every inherited listener not taken, if there is one.
    pub(crate) fn check() -> Result<(), Error> {
        let untaken = untaken();
        if untaken.is_empty() {
            return Ok(());
        }
        let each: Vec<String> = untaken
            .iter()
            .map(|(fd, name, url)| format!("fd {fd} (name {name:?}, {url})"))
            .collect();
        let names: Vec<&str> = untaken.iter().map(|(_, n, _)| n.as_str()).collect();
        Err(Error::config(format!(
            "inherited listener(s) not served: {}. The service manager passed {} that no service \
             of this process takes, so clients would wait on {} until they time out. Take it by \
             its name ({}), or give the socket the name this service takes where it is made \
             (FileDescriptorName= in the socket unit, systemd-socket-activate --fdname=NAME), or \
             close what this service does not serve with Listeners::close_unused()",
            each.join(", "),
            if untaken.len() == 1 {
                "a socket"
            } else {
                "sockets"
            },
            if untaken.len() == 1 { "it" } else { "them" },
            names
                .iter()
                .map(|n| format!("Listeners::take_or_bind({n:?}, ..)"))
                .collect::<Vec<_>>()
                .join(", "),
        )))
    }
}

pub(crate) use untaken::check as check_untaken;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listener_handover_bound_itself_is_the_service_s_alone() {
        // The door (a socket filter that outlives this process in every other holder) is
        // only for these: a listener the application hands in may be held elsewhere too.
        let bound = Listeners::bind("127.0.0.1:0".parse().expect("address")).expect("bind");
        assert!(bound.iter().all(Listener::is_exclusive));
        let std = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        assert!(!Listener::try_from(std).expect("wrap").is_exclusive());
        let dir = std::env::temp_dir().join(format!("handover-excl-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let unix = std::os::unix::net::UnixListener::bind(&dir).expect("bind");
        assert!(!Listener::try_from(unix).expect("wrap").is_exclusive());
        let _ = std::fs::remove_file(&dir);
    }
    use proptest::prelude::*;
    use std::os::unix::ffi::OsStrExt;

    fn any_value() -> impl Strategy<Value = Option<Vec<u8>>> {
        prop_oneof![
            Just(None),
            "[0-9]{0,6}".prop_map(|s| Some(s.into_bytes())),
            "[0-9a-z:, -]{0,16}".prop_map(|s| Some(s.into_bytes())),
            proptest::collection::vec(any::<u8>(), 0..24).prop_map(Some),
        ]
    }

    proptest! {
        #[test]
        fn listen_env_parsing_never_panics_and_is_consistent(
            fds in any_value(), pid in any_value(), names in any_value(), first in any_value(),
        ) {
            fn os(v: &Option<Vec<u8>>) -> Option<&OsStr> {
                v.as_deref().map(OsStr::from_bytes)
            }
            let values = EnvValues { fds: os(&fds), pid: os(&pid), names: os(&names), first_fd: os(&first), our_pid: 42 };
            match parse_env(&values) {
                Ok(Some(list)) => {
                    prop_assert!(!list.is_empty());
                    let start = list[0].0;
                    prop_assert!(start >= 3);
                    for (i, (fd, _)) in list.iter().enumerate() {
                        prop_assert_eq!(*fd, start + i as RawFd);
                    }
                }
                Ok(None) => {}
                Err(e) => prop_assert!(e.variable().is_some_and(|v| v.starts_with("LISTEN_"))),
            }
        }

        #[test]
        fn fd_names_are_valid_for_systemd(name in ".{0,300}") {
            let n = fd_name(&name);
            prop_assert!(n.chars().count() <= 255);
            prop_assert!(n.chars().all(|c| c.is_ascii_graphic() && c != ':'));
        }
    }

    fn env<'a>(
        fds: Option<&'a str>,
        pid: Option<&'a str>,
        names: Option<&'a str>,
        first: Option<&'a str>,
    ) -> EnvValues<'a> {
        EnvValues {
            fds: fds.map(OsStr::new),
            pid: pid.map(OsStr::new),
            names: names.map(OsStr::new),
            first_fd: first.map(OsStr::new),
            our_pid: 42,
        }
    }

    #[test]
    fn accepted_values() {
        let got = |e| parse_env(&e).expect("valid");
        assert_eq!(got(env(None, None, None, None)), None);
        assert_eq!(got(env(Some("0"), Some("42"), None, None)), None);
        assert_eq!(
            got(env(Some("2"), Some("42"), None, None)),
            Some(vec![(3, "unknown".into()), (4, "unknown".into())])
        );
        assert_eq!(
            got(env(Some("2"), Some("42"), Some("http:admin"), None)),
            Some(vec![(3, "http".into()), (4, "admin".into())])
        );
        // systemfd --no-pid: no LISTEN_PID, fds accepted.
        assert_eq!(
            got(env(Some("1"), None, None, Some("5"))),
            Some(vec![(5, "unknown".into())])
        );
        // Meant for another process: ignored, not an error.
        assert_eq!(got(env(Some("1"), Some("41"), None, None)), None);
        // Another process's LISTEN_PID wins even over a malformed LISTEN_FDS.
        assert_eq!(got(env(Some("x"), Some("41"), None, None)), None);
        // As sd_listen_fds: no fds, whatever the names say (a warning is logged).
        assert_eq!(got(env(Some("0"), Some("42"), Some("web"), None)), None);
        assert_eq!(got(env(Some("0"), None, Some("a:b"), None)), None);
    }

    #[test]
    fn malformed_values_name_the_variable() {
        let cases = [
            (env(Some(""), Some("42"), None, None), "LISTEN_FDS"),
            (env(Some("-1"), Some("42"), None, None), "LISTEN_FDS"),
            (env(Some(" 1"), Some("42"), None, None), "LISTEN_FDS"),
            (env(Some("1x"), Some("42"), None, None), "LISTEN_FDS"),
            (
                env(Some("99999999999"), Some("42"), None, None),
                "LISTEN_FDS",
            ),
            (env(Some("5000"), Some("42"), None, None), "LISTEN_FDS"),
            (env(Some("1"), Some("abc"), None, None), "LISTEN_PID"),
            (env(Some("1"), Some("0"), None, None), "LISTEN_PID"),
            (env(Some("1"), Some(""), None, None), "LISTEN_PID"),
            (
                env(Some("2"), Some("42"), Some("one"), None),
                "LISTEN_FDNAMES",
            ),
            (
                env(Some("1"), Some("42"), Some("a:b"), None),
                "LISTEN_FDNAMES",
            ),
            (
                env(Some("1"), Some("42"), None, Some("2")),
                "LISTEN_FDS_FIRST_FD",
            ),
            (
                env(Some("1"), Some("42"), None, Some("x")),
                "LISTEN_FDS_FIRST_FD",
            ),
        ];
        for (values, var) in cases {
            let err = parse_env(&values).expect_err(&format!("{values:?} must be rejected"));
            assert_eq!(err.variable(), Some(var), "{values:?}: {err}");
            assert!(err.to_string().contains("expected"), "{err}");
        }
    }
}
