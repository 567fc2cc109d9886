//! TLS session tickets that outlive the process (feature `rustls`).
//!
//! rustls's own `Ticketer` keeps its keys in process memory, so every restart would forget
//! every TLS session: each client's next connection is a full handshake, all at once after a
//! deploy. handover's [`Ticketer`] is rustls's scheme (an AEAD key per period, the current key
//! and the previous one accepted, 6 hours per period by default, as rustls's) with keys that
//! travel:
//!
//! - **Restart** (`SIGUSR1`, `systemctl reload`, [`crate::Handle::restart`]): the old process
//!   sends the keys (current and previous, and when each was made) over the private channel to
//!   the new one, before the new one runs; the new one takes them at start-up, before any
//!   handshake. Never a file, the environment or the command line.
//! - **`systemctl restart`, a crash** (with `Server::fd_store(true)`): the keys are also in the
//!   service manager's fd store, a sealed memfd named [`FDNAME`], replaced at each rotation
//!   (`FDSTOREREMOVE=1`, `FDSTORE=1`); the next process gets it back in `LISTEN_FDS`, where
//!   `Listeners::from_env` takes it ([`restore`]) instead of treating it as a listener. Only
//!   the service's own processes ever get it.
//! - **Zeroized** when dropped (`zeroize`): the keys and the messages that carry them (not
//!   ring's expanded key schedule inside its `LessSafeKey`, which ring does not zeroize).
//! - **Rotation** is by the wall clock (the time a key was made travels with it): the current
//!   key is replaced once it is one period old, the previous one dropped; a ticket is accepted
//!   while its key is current or previous, so for at least one period and at most two, and
//!   never longer, whatever the restarts. Set the period with
//!   [`crate::Server::session_ticket_rotation`].
//!
//! Tickets are sealed with ChaCha20-Poly1305 (ring), a fresh random nonce each, the key's
//! random 16-byte name in front (authenticated too): the layout of rustls's own ticketer.
//! 0-RTT stays off: handover never sets `max_early_data_size`.
//!
//! # On the channel
//! One message of its own kind, old → new, queued before the new process starts:
//! `X_HANDOVER_TICKETS\n`, a version byte (1), a key count (1 or 2), then per key (current
//! first) its name (16 bytes), its secret (32 bytes), and when it was made (u64, milliseconds
//! since the Unix epoch, big-endian).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

/// The first line of the keys message on the channel (`startup` takes it off the channel).
const KIND: &[u8] = b"X_HANDOVER_TICKETS\n";

const VERSION: u8 = 1;
const NAME_LEN: usize = 16;
const SECRET_LEN: usize = 32;
const KEY_LEN: usize = NAME_LEN + SECRET_LEN + 8;

/// rustls's default: its `Ticketer` makes a new key every 6 hours.
pub(crate) const DEFAULT_ROTATION: Duration = Duration::from_secs(6 * 60 * 60);

static AEAD: &aead::Algorithm = &aead::CHACHA20_POLY1305;

/// One ticket key.
struct Key {
    name: [u8; NAME_LEN],
    secret: Zeroizing<[u8; SECRET_LEN]>,
    /// Milliseconds since the Unix epoch.
    made: u64,
    /// ring's copy of the secret (ring zeroizes nothing; it is dropped with the rest).
    sealing: LessSafeKey,
}

impl Key {
    fn from_parts(
        name: [u8; NAME_LEN],
        secret: Zeroizing<[u8; SECRET_LEN]>,
        made: u64,
    ) -> Option<Key> {
        let unbound = UnboundKey::new(AEAD, &secret[..]).ok()?;
        Some(Key {
            name,
            secret,
            made,
            sealing: LessSafeKey::new(unbound),
        })
    }

    fn generate(made: u64) -> Option<Key> {
        let rng = SystemRandom::new();
        let mut name = [0u8; NAME_LEN];
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        rng.fill(&mut name).ok()?;
        rng.fill(&mut secret[..]).ok()?;
        Key::from_parts(name, secret, made)
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.name.zeroize();
    }
}

/// The keys in use.
struct Keys {
    current: Key,
    previous: Option<Key>,
}

/// handover's `rustls::server::ProducesTickets`: rustls's rotation scheme, with keys that a
/// restart passes to the new process (see the module docs).
pub(crate) struct Ticketer {
    keys: RwLock<Option<Keys>>,
    /// The rotation period in milliseconds.
    period_ms: AtomicU64,
    /// The longest ticket made so far: longer ones are refused before any decryption (as
    /// rustls's own ticketer does).
    longest: AtomicU64,
    now: fn() -> u64,
    /// The service manager's fd store, once the server asked for it (`Server::fd_store`):
    /// every new set of keys is stored there.
    fd_store: std::sync::Mutex<Option<Arc<crate::notify::Notifier>>>,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

static TICKETER: OnceLock<Arc<Ticketer>> = OnceLock::new();

/// The process's ticketer, shared by every TLS listener.
pub(crate) fn ticketer() -> Arc<Ticketer> {
    Arc::clone(TICKETER.get_or_init(|| Arc::new(Ticketer::new(wall_clock_ms))))
}

/// Sets `ticketer` on `config`, unless the config has an enabled one of its own.
pub(crate) fn apply(config: &mut rustls::ServerConfig) {
    if !config.ticketer.enabled() {
        config.ticketer = ticketer();
    }
}

/// The keys message for a new process, if this process has a ticketer (it serves TLS).
pub(crate) fn message_for_successor() -> Option<Zeroizing<Vec<u8>>> {
    TICKETER.get()?.export()
}

/// The name of the ticket keys in the service manager's fd store (`FDNAME=`), and so in
/// `LISTEN_FDNAMES` when systemd gives them back.
pub(crate) const FDNAME: &str = crate::startup::TICKETS_FDNAME;

/// Keeps the keys in the service manager's fd store from now on (`Server::fd_store(true)` with
/// a TLS listener): stored now, and again at every rotation.
/// `store_now`: also now (not in a process a restart started: its keys are its parent's,
/// stored already, and the manager takes `FDSTORE=1` from the main process only).
pub(crate) fn keep_in_fd_store(notifier: Arc<crate::notify::Notifier>, store_now: bool) {
    let ticketer = ticketer();
    *ticketer.fd_store.lock().unwrap_or_else(|p| p.into_inner()) = Some(notifier);
    if !store_now {
        return;
    }
    let keys = ticketer.keys.read().unwrap_or_else(|p| p.into_inner());
    match keys.as_ref() {
        Some(k) => ticketer.store(k),
        None => {
            drop(keys);
            // Makes (and so stores) the first keys now, not at the first handshake.
            let _ = ticketer.export();
        }
    }
}

/// A memfd holding `contents`, sealed: nobody can change, grow or shrink it any more, nor
/// remove the seals. What the fd store keeps is then exactly what was written.
fn sealed_memfd(contents: &[u8]) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(FDNAME, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    let mut written = 0;
    // Bounded: each turn writes at least a byte, or fails.
    while written < contents.len() {
        match rustix::io::write(&fd, &contents[written..])? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => written += n,
        }
    }
    rustix::fs::fcntl_add_seals(
        &fd,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )?;
    Ok(fd)
}

/// Takes the keys the service manager gave back from its fd store (the memfd [`FDNAME`] in
/// `LISTEN_FDS`, after a `systemctl restart` or a crash): only from a sealed memfd, which is
/// what a process of this service stored.
pub(crate) fn restore(fd: std::os::fd::OwnedFd) {
    use rustix::fs::SealFlags;
    let needed = SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL;
    match rustix::fs::fcntl_get_seals(&fd) {
        Ok(seals) if seals.contains(needed) => {}
        _ => {
            tracing::warn!("the {FDNAME} fd of the fd store is not a sealed memfd; ignored");
            return;
        }
    }
    let mut buf = Zeroizing::new(vec![0u8; KIND.len() + 2 + 2 * KEY_LEN + 1]);
    match rustix::io::pread(&fd, &mut buf[..], 0) {
        Ok(n) => match ticketer().import(&buf[..n]) {
            Ok(keys) => tracing::info!(keys, "took the TLS session ticket keys from the fd store"),
            Err(e) => tracing::warn!(
                "the TLS session ticket keys in the fd store are unusable ({e}); new keys are made"
            ),
        },
        Err(e) => {
            tracing::warn!(error = %e, "could not read the TLS session ticket keys of the fd store")
        }
    }
}

/// Takes the keys a previous process sent (the whole message, [`KIND`] included).
pub(crate) fn adopt(message: &[u8]) {
    match ticketer().import(message) {
        Ok(n) => tracing::info!(
            keys = n,
            "took the TLS session ticket keys of the previous process"
        ),
        Err(e) => tracing::warn!(
            "the TLS session ticket keys of the previous process are unusable ({e}); new keys are made"
        ),
    }
}

impl Ticketer {
    fn new(now: fn() -> u64) -> Ticketer {
        Ticketer {
            keys: RwLock::new(None),
            period_ms: AtomicU64::new(DEFAULT_ROTATION.as_millis() as u64),
            longest: AtomicU64::new(0),
            now,
            fd_store: std::sync::Mutex::new(None),
        }
    }

    /// Puts `keys` in the fd store, if asked to: a sealed memfd under [`FDNAME`], replacing the
    /// one stored before. Best effort, never blocks: a manager that refuses it (no
    /// `FileDescriptorStoreMax=` room, a process that is not the main one) only costs the
    /// sessions of the next `systemctl restart`.
    fn store(&self, keys: &Keys) {
        let notifier = self
            .fd_store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(notifier) = notifier else { return };
        match sealed_memfd(&encode(keys)) {
            Ok(fd) => {
                use std::os::fd::AsFd;
                notifier.replace_stored(fd.as_fd(), FDNAME, "the TLS session ticket keys");
            }
            Err(e) => tracing::warn!(
                error = %e,
                "could not make the memfd for the fd store; TLS sessions will not survive a systemctl restart"
            ),
        }
    }

    /// Sets the rotation period (at least one second).
    pub(crate) fn set_period(&self, period: Duration) {
        let ms = u64::try_from(period.as_millis())
            .unwrap_or(u64::MAX)
            .max(1000);
        self.period_ms.store(ms, Ordering::Relaxed);
    }

    fn period(&self) -> u64 {
        self.period_ms.load(Ordering::Relaxed)
    }

    /// The keys, rotated for `now` if due; made if there are none.
    fn with_keys<R>(&self, f: impl FnOnce(&Keys, u64) -> R) -> Option<R> {
        let now = (self.now)();
        let period = self.period();
        {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            if let Some(k) = keys.as_ref() {
                if now < k.current.made.saturating_add(period) {
                    return Some(f(k, now));
                }
            }
        }
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let rotated = match keys.take() {
            // Another thread rotated meanwhile.
            Some(k) if now < k.current.made.saturating_add(period) => k,
            // One period old: the current key becomes the previous one.
            Some(k) if now < k.current.made.saturating_add(period.saturating_mul(2)) => Keys {
                current: Key::generate(now)?,
                previous: Some(k.current),
            },
            // Older (nothing was made or read for a while): both are out of their window.
            _ => Keys {
                current: Key::generate(now)?,
                previous: None,
            },
        };
        let result = f(&rotated, now);
        self.store(&rotated);
        *keys = Some(rotated);
        Some(result)
    }

    /// The keys, current first, as the message for a new process.
    fn export(&self) -> Option<Zeroizing<Vec<u8>>> {
        self.with_keys(|keys, _| encode(keys))
    }

    /// Replaces the keys with those of `message`; returns how many.
    fn import(&self, message: &[u8]) -> Result<usize, &'static str> {
        let body = message.strip_prefix(KIND).ok_or("not a keys message")?;
        let (&version, body) = body.split_first().ok_or("empty")?;
        if version != VERSION {
            return Err("unknown version");
        }
        let (&count, body) = body.split_first().ok_or("no key count")?;
        if !(1..=2).contains(&count) || body.len() != usize::from(count) * KEY_LEN {
            return Err("malformed");
        }
        let mut parsed = Vec::with_capacity(2);
        for chunk in body.chunks_exact(KEY_LEN) {
            let mut name = [0u8; NAME_LEN];
            name.copy_from_slice(&chunk[..NAME_LEN]);
            let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
            secret.copy_from_slice(&chunk[NAME_LEN..NAME_LEN + SECRET_LEN]);
            let mut made = [0u8; 8];
            made.copy_from_slice(&chunk[NAME_LEN + SECRET_LEN..]);
            parsed.push(Key::from_parts(name, secret, u64::from_be_bytes(made)).ok_or("bad key")?);
        }
        let mut keys = parsed.into_iter();
        let current = keys.next().ok_or("no key")?;
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Some(Keys {
            current,
            previous: keys.next(),
        });
        Ok(usize::from(count))
    }
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    /// Two periods, as rustls's own ticketer says: the longest a ticket can be accepted.
    fn lifetime(&self) -> u32 {
        u32::try_from(self.period().saturating_mul(2) / 1000).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; 12];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let ticket = self.with_keys(|keys, _| {
            let key = &keys.current;
            let mut out = Vec::with_capacity(NAME_LEN + nonce.len() + plain.len() + AEAD.tag_len());
            out.extend_from_slice(&key.name);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(plain);
            let tag = key
                .sealing
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(key.name),
                    &mut out[NAME_LEN + 12..],
                )
                .ok()?;
            out.extend_from_slice(tag.as_ref());
            Some(out)
        })??;
        self.longest
            .fetch_max(ticket.len() as u64, Ordering::Relaxed);
        Some(ticket)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        // Longer than any ticket made here (or by a previous process: a few hundred bytes).
        let bound = self.longest.load(Ordering::Relaxed).max(4096);
        if ticket.len() as u64 > bound || ticket.len() < NAME_LEN + 12 + AEAD.tag_len() {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(12);
        self.with_keys(|keys, now| {
            let period = self.period();
            let key = std::iter::once(&keys.current)
                .chain(keys.previous.as_ref())
                // Constant time: a wrong name must not tell how much of it was right.
                .find(|k| ring_eq(&k.name, name))?;
            // Within two periods of the key's making, whatever the clock did meanwhile.
            if now >= key.made.saturating_add(period.saturating_mul(2)) {
                return None;
            }
            let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
            let mut out = sealed.to_vec();
            let len = key
                .sealing
                .open_in_place(nonce, Aad::from(&key.name), &mut out)
                .ok()?
                .len();
            out.truncate(len);
            Some(out)
        })?
    }
}

/// The keys message (see the module docs).
fn encode(keys: &Keys) -> Zeroizing<Vec<u8>> {
    let mut msg = Zeroizing::new(Vec::with_capacity(KIND.len() + 2 + 2 * KEY_LEN));
    msg.extend_from_slice(KIND);
    msg.push(VERSION);
    let list: Vec<&Key> = std::iter::once(&keys.current)
        .chain(keys.previous.as_ref())
        .collect();
    msg.push(list.len() as u8);
    for key in list {
        msg.extend_from_slice(&key.name);
        msg.extend_from_slice(&key.secret[..]);
        msg.extend_from_slice(&key.made.to_be_bytes());
    }
    msg
}

/// Equal, in time that depends on the length only.
fn ring_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys.
        f.debug_struct("handover::Ticketer")
            .field("rotation", &Duration::from_millis(self.period()))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;
    use std::sync::atomic::AtomicU64;

    proptest::proptest! {
        /// Whatever a client sends as a ticket, or a peer as keys: refused or read, never a
        /// panic; a forged ticket never opens.
        #[test]
        fn hostile_tickets_and_key_messages_are_refused_without_panicking(
            ticket in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            keys in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let t = Ticketer::new(wall_clock_ms);
            let real = t.encrypt(b"x").expect("ticket");
            proptest::prop_assert_eq!(t.decrypt(&ticket), None);
            let mut forged = real.clone();
            forged[..NAME_LEN.min(ticket.len())].copy_from_slice(&ticket[..NAME_LEN.min(ticket.len())]);
            if forged != real {
                proptest::prop_assert_eq!(t.decrypt(&forged), None);
            }
            let mut message = KIND.to_vec();
            message.extend_from_slice(&keys);
            let _ = t.import(&message);
            let _ = t.import(&keys);
        }
    }

    static CLOCK: AtomicU64 = AtomicU64::new(1_000_000);

    fn clock() -> u64 {
        CLOCK.load(Ordering::SeqCst)
    }

    fn advance(ms: u64) {
        CLOCK.fetch_add(ms, Ordering::SeqCst);
    }

    const HOUR: u64 = 3_600_000;

    // One test drives the shared clock, so the cases run in order.
    #[test]
    fn rotation_expiry_and_the_keys_carried_to_a_new_process() {
        let old = Ticketer::new(clock);
        assert_eq!(old.lifetime(), 12 * 3600, "two periods of 6 hours");
        let ticket = old.encrypt(b"session").expect("ticket");
        assert_eq!(old.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        // Tampered, truncated, foreign: refused.
        let mut bad = ticket.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(old.decrypt(&bad), None);
        assert_eq!(old.decrypt(&ticket[..20]), None);
        assert_eq!(Ticketer::new(clock).decrypt(&ticket), None);

        // A new process with the old one's keys reads its tickets, and the other way round.
        let msg = old.export().expect("keys");
        let new = Ticketer::new(clock);
        assert_eq!(new.import(&msg), Ok(1));
        assert_eq!(new.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        let from_new = new.encrypt(b"two").expect("ticket");
        assert_eq!(old.decrypt(&from_new).as_deref(), Some(&b"two"[..]));

        // After one period: a new current key; the ticket of the previous one still reads.
        advance(6 * HOUR + 1);
        let later = new.encrypt(b"later").expect("ticket");
        assert_ne!(later[..NAME_LEN], ticket[..NAME_LEN], "rotated");
        assert_eq!(new.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        // Both keys travel.
        let third = Ticketer::new(clock);
        assert_eq!(third.import(&new.export().expect("keys")), Ok(2));
        assert_eq!(third.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        assert_eq!(third.decrypt(&later).as_deref(), Some(&b"later"[..]));

        // Two periods after its key was made, a ticket is refused, in every process.
        advance(6 * HOUR);
        assert_eq!(third.decrypt(&ticket), None);
        assert_eq!(new.decrypt(&ticket), None);
        assert_eq!(third.decrypt(&later).as_deref(), Some(&b"later"[..]));
        advance(6 * HOUR);
        assert_eq!(third.decrypt(&later), None);

        // A shorter period, as configured.
        third.set_period(Duration::from_secs(2));
        assert_eq!(third.lifetime(), 4);
        let short = third.encrypt(b"short").expect("ticket");
        advance(3_999);
        assert_eq!(third.decrypt(&short).as_deref(), Some(&b"short"[..]));
        advance(1);
        assert_eq!(third.decrypt(&short), None);

        // Malformed messages change nothing.
        for bad in [
            &b""[..],
            KIND,
            &msg[..msg.len() - 1],
            b"X_HANDOVER_TICKETS\n\x02\x01",
        ] {
            assert!(third.import(bad).is_err());
        }
        assert!(format!("{third:?}").contains("rotation: 2s"));
    }
}
