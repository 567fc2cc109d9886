//! Loading a certificate chain and its private key from PEM files (feature `rustls`), with
//! errors that name the file and the problem.
//!
//! rustls-pki-types' PEM parser reads the files; this module adds what its iterators leave to
//! the caller: a file with no PEM block in it (which the iterators read as "no items"), a chain
//! file without a certificate, a key file without a key, and a key that is not the
//! certificate's, each reported with the path, so that a new process started with broken files
//! says exactly which file is wrong before it reports `READY=1`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject, SectionKind};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
};

/// A certificate chain and the private key of its first certificate, read from PEM files and
/// checked to belong together (feature `rustls`).
///
/// [`TlsCertificate::load_pem`] reads the chain (`CERTIFICATE` blocks, the server's own first)
/// and the key (`PRIVATE KEY` (PKCS#8), `RSA PRIVATE KEY` (PKCS#1) or `EC PRIVATE KEY` (SEC1),
/// the key types rustls supports); both may be the same file. Every failure is a
/// [`CertificateError`] naming the file and what is wrong with it. In a process started by a
/// handover restart, that error is also the reason the old process reports
/// ([`crate::RestartError::reason`]) if this process then exits before it is ready.
///
/// # Example
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let web = handover::Listeners::from_env()?.take_or_bind("web", "127.0.0.1:8443".parse()?)?;
/// # let app = tower::service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
/// #     Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
/// # });
/// use std::sync::Arc;
///
/// let config = handover::TlsCertificate::load_pem(
///     "/etc/myapp/tls/fullchain.pem",
///     "/etc/myapp/tls/key.pem",
/// )?
/// .server_config()?;
/// let server = handover::serve([web], app).tls("web", Arc::new(config));
/// # Ok(())
/// # }
/// ```
pub struct TlsCertificate {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

/// Why a certificate or key file could not be used: [`CertificateError::path`] is the file,
/// [`CertificateError::kind`] the problem; the message says both.
#[derive(Debug, Clone)]
pub struct CertificateError {
    path: PathBuf,
    file: File,
    kind: CertificateErrorKind,
    detail: String,
}

/// What is wrong with the file of a [`CertificateError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertificateErrorKind {
    /// The file cannot be read (missing, no permission, a directory).
    Io(io::ErrorKind),
    /// The file is not PEM: no `-----BEGIN ...-----` block, or a malformed one.
    NotPem,
    /// The chain file is PEM, but holds no `CERTIFICATE` block.
    NoCertificate,
    /// The key file is PEM, but holds no private key block.
    NoKey,
    /// The private key is not the key of the chain's first certificate.
    KeyMismatch,
    /// A block could not be used: a key of a type rustls does not support, a certificate that
    /// does not parse.
    Unusable,
}

/// Which of the two files an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum File {
    Chain,
    Key,
}

impl File {
    fn what(self) -> &'static str {
        match self {
            File::Chain => "TLS certificate file",
            File::Key => "TLS private key file",
        }
    }
}

impl TlsCertificate {
    /// Reads the certificate chain in `cert` and the private key in `key` (PEM; they may be
    /// one file), and checks that the key is the first certificate's.
    ///
    /// # Errors
    /// A [`CertificateError`] naming the file: unreadable, not PEM, no certificate, no key, a
    /// key that does not match the certificate, or a block rustls cannot use.
    pub fn load_pem(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<TlsCertificate, CertificateError> {
        let result = load(cert.as_ref(), key.as_ref());
        if let Err(e) = &result {
            // A restarted process that exits over this error says why to its parent.
            crate::reason::report(e);
        }
        result
    }

    /// The certificate chain, the server's own certificate first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The chain and the key, for a `rustls::ServerConfig` built by hand (client certificates:
    /// `with_client_cert_verifier(..).with_single_cert(chain, key)`).
    pub fn into_parts(self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.chain, self.key)
    }

    /// A `rustls::ServerConfig` serving this certificate: crypto provider `ring` (the one
    /// handover's `rustls` feature enables), rustls's safe default protocol versions (TLS 1.3
    /// and 1.2), no client certificates. ALPN is left empty, so [`crate::Server::tls`] sets
    /// `h2`, `http/1.1`; session tickets are handover's ([`crate::Server::tls`] says how).
    ///
    /// # Errors
    /// Only if rustls refuses the key after all (a [`CertificateErrorKind::Unusable`] naming
    /// the key file).
    pub fn server_config(self) -> Result<rustls::ServerConfig, CertificateError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key_path = self.key_path.clone();
        let unusable = |e: rustls::Error| CertificateError {
            path: key_path.clone(),
            file: File::Key,
            kind: CertificateErrorKind::Unusable,
            detail: format!("rustls refused it: {e}"),
        };
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(unusable)?
            .with_no_client_auth()
            .with_single_cert(self.chain, self.key)
            .map_err(unusable)
    }
}

impl fmt::Debug for TlsCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("TlsCertificate")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl CertificateError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What is wrong with it.
    pub fn kind(&self) -> CertificateErrorKind {
        self.kind
    }
}

impl fmt::Display for CertificateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.file.what(),
            self.path.display(),
            self.detail
        )
    }
}

impl std::error::Error for CertificateError {}

impl From<CertificateError> for io::Error {
    fn from(e: CertificateError) -> io::Error {
        let kind = match e.kind {
            CertificateErrorKind::Io(kind) => kind,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// Files larger than this are not certificate files (a chain is a few KiB).
const MAX_FILE: u64 = 1 << 20;

fn load(cert: &Path, key: &Path) -> Result<TlsCertificate, CertificateError> {
    let sections = read_sections(cert, File::Chain)?;
    let chain: Vec<CertificateDer<'static>> = sections
        .iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der.clone()))
        .collect();
    if chain.is_empty() {
        return Err(CertificateError {
            path: cert.to_path_buf(),
            file: File::Chain,
            kind: CertificateErrorKind::NoCertificate,
            detail: format!(
                "no certificate in it (it holds {}; expected PEM \"CERTIFICATE\" blocks)",
                kinds(&sections)
            ),
        });
    }
    let sections = read_sections(key, File::Key)?;
    let found = sections.iter().find_map(|(kind, der)| match kind {
        SectionKind::PrivateKey => Some(PrivateKeyDer::from(PrivatePkcs8KeyDer::from(der.clone()))),
        SectionKind::RsaPrivateKey => {
            Some(PrivateKeyDer::from(PrivatePkcs1KeyDer::from(der.clone())))
        }
        SectionKind::EcPrivateKey => {
            Some(PrivateKeyDer::from(PrivateSec1KeyDer::from(der.clone())))
        }
        _ => None,
    });
    let Some(private_key) = found else {
        return Err(CertificateError {
            path: key.to_path_buf(),
            file: File::Key,
            kind: CertificateErrorKind::NoKey,
            detail: format!(
                "no private key in it (it holds {}; expected a PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" block)",
                kinds(&sections)
            ),
        });
    };
    check_pair(&chain, &private_key, cert, key)?;
    Ok(TlsCertificate {
        chain,
        key: private_key,
        cert_path: cert.to_path_buf(),
        key_path: key.to_path_buf(),
    })
}

/// Every PEM block of `path`, or why there is none.
fn read_sections(path: &Path, file: File) -> Result<Vec<(SectionKind, Vec<u8>)>, CertificateError> {
    let error = |kind, detail: String| CertificateError {
        path: path.to_path_buf(),
        file,
        kind,
        detail,
    };
    let io_error = |e: io::Error| {
        error(
            CertificateErrorKind::Io(e.kind()),
            format!("cannot read it: {e}"),
        )
    };
    let size = std::fs::metadata(path).map_err(io_error)?.len();
    if size > MAX_FILE {
        return Err(error(
            CertificateErrorKind::NotPem,
            format!("not a PEM certificate or key file: {size} bytes, more than {MAX_FILE}"),
        ));
    }
    let bytes = std::fs::read(path).map_err(io_error)?;
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| error(CertificateErrorKind::NotPem, format!("not valid PEM: {e}")))?;
    if sections.is_empty() {
        return Err(error(
            CertificateErrorKind::NotPem,
            format!(
                "not PEM: no \"-----BEGIN ...-----\" block in it (expected {})",
                match file {
                    File::Chain => "PEM \"CERTIFICATE\" blocks",
                    File::Key => "a PEM \"PRIVATE KEY\" block",
                }
            ),
        ));
    }
    Ok(sections)
}

/// The kinds of PEM blocks, for an error message: `PRIVATE KEY, CERTIFICATE`.
fn kinds(sections: &[(SectionKind, Vec<u8>)]) -> String {
    let mut names: Vec<String> = Vec::new();
    for (kind, _) in sections {
        let name = match kind {
            SectionKind::Certificate => "CERTIFICATE",
            SectionKind::PublicKey => "PUBLIC KEY",
            SectionKind::RsaPrivateKey => "RSA PRIVATE KEY",
            SectionKind::PrivateKey => "PRIVATE KEY",
            SectionKind::EcPrivateKey => "EC PRIVATE KEY",
            SectionKind::Crl => "X509 CRL",
            SectionKind::Csr => "CERTIFICATE REQUEST",
            _ => "another PEM block",
        }
        .to_string();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names.join(", ")
}

/// The key loads (a type rustls supports) and is the first certificate's.
fn check_pair(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), CertificateError> {
    let provider = rustls::crypto::ring::default_provider();
    match rustls::sign::CertifiedKey::from_der(chain.to_vec(), key.clone_key(), &provider) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => Err(CertificateError {
            path: key_path.to_path_buf(),
            file: File::Key,
            kind: CertificateErrorKind::KeyMismatch,
            detail: format!(
                "does not match the certificate in {} (the key is not that certificate's)",
                cert_path.display()
            ),
        }),
        // The key was loaded before the certificate was parsed: an error naming the
        // certificate comes from the certificate.
        Err(
            e @ (rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented),
        ) => Err(CertificateError {
            path: cert_path.to_path_buf(),
            file: File::Chain,
            kind: CertificateErrorKind::Unusable,
            detail: format!("its first certificate is unusable: {e}"),
        }),
        Err(e) => Err(CertificateError {
            path: key_path.to_path_buf(),
            file: File::Key,
            kind: CertificateErrorKind::Unusable,
            detail: format!("the key is unusable: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let dir = std::env::temp_dir().join(format!(
                "handover-certs-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("scratch dir");
            Dir(dir)
        }

        fn file(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).expect("write");
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn pair() -> (String, String) {
        let cert =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
        (cert.cert.pem(), cert.signing_key.serialize_pem())
    }

    fn err(cert: &Path, key: &Path) -> CertificateError {
        TlsCertificate::load_pem(cert, key).expect_err("an error")
    }

    #[test]
    fn a_matching_pair_loads_and_makes_a_server_config() {
        let dir = Dir::new("ok");
        let (cert, key) = pair();
        let c = dir.file("cert.pem", &cert);
        let k = dir.file("key.pem", &key);
        let loaded = TlsCertificate::load_pem(&c, &k).expect("loads");
        assert_eq!(loaded.chain().len(), 1);
        let debug = format!("{loaded:?}");
        assert!(!debug.contains("PRIVATE"), "{debug}");
        loaded.server_config().expect("config");
        // One file holding both.
        let both = dir.file("both.pem", &format!("{key}{cert}"));
        TlsCertificate::load_pem(&both, &both).expect("one file");
    }

    #[test]
    fn each_problem_names_the_file_and_what_is_wrong() {
        let dir = Dir::new("errors");
        let (cert, key) = pair();
        let (_, other_key) = pair();
        let c = dir.file("cert.pem", &cert);
        let k = dir.file("key.pem", &key);
        let missing = dir.0.join("missing.pem");
        let text = dir.file("text.pem", "not a certificate\n");
        let broken = dir.file("broken.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n");
        let other = dir.file("other.pem", &other_key);

        let e = err(&missing, &k);
        assert_eq!(e.kind(), CertificateErrorKind::Io(io::ErrorKind::NotFound));
        assert_eq!(e.path(), missing);
        assert!(
            e.to_string().starts_with(&format!(
                "TLS certificate file {}: cannot read it: ",
                missing.display()
            )),
            "{e}"
        );

        let e = err(&text, &k);
        assert_eq!(
            (e.kind(), e.path()),
            (CertificateErrorKind::NotPem, text.as_path())
        );
        assert!(
            e.to_string()
                .contains("not PEM: no \"-----BEGIN ...-----\" block"),
            "{e}"
        );

        let e = err(&broken, &k);
        assert_eq!(e.kind(), CertificateErrorKind::NotPem);
        assert!(e.to_string().contains("not valid PEM"), "{e}");

        let e = err(&k, &k);
        assert_eq!(
            (e.kind(), e.path()),
            (CertificateErrorKind::NoCertificate, k.as_path())
        );
        assert_eq!(
            e.to_string(),
            format!(
                "TLS certificate file {}: no certificate in it (it holds PRIVATE KEY; expected PEM \"CERTIFICATE\" blocks)",
                k.display()
            )
        );

        let e = err(&c, &c);
        assert_eq!(
            (e.kind(), e.path()),
            (CertificateErrorKind::NoKey, c.as_path())
        );
        assert!(
            e.to_string().starts_with(&format!(
                "TLS private key file {}: no private key in it (it holds CERTIFICATE;",
                c.display()
            )),
            "{e}"
        );

        let e = err(&c, &text);
        assert_eq!(
            (e.kind(), e.path()),
            (CertificateErrorKind::NotPem, text.as_path())
        );
        assert!(e.to_string().starts_with("TLS private key file "), "{e}");

        let e = err(&c, &other);
        assert_eq!(
            (e.kind(), e.path()),
            (CertificateErrorKind::KeyMismatch, other.as_path())
        );
        assert!(
            e.to_string().starts_with(&format!(
                "TLS private key file {}: does not match the certificate in {}",
                other.display(),
                c.display()
            )),
            "{e}"
        );
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::InvalidData);
    }
}
