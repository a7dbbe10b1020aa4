//! TLS over a monoio TCP stream: the handshake, then read and write halves
//! that share one rustls connection.
//!
//! rustls is sans-IO: it turns ciphertext into plaintext and back in memory.
//! Each half borrows the shared connection only between awaits (never across
//! one), so the reader and writer tasks of a connection can run as they do
//! over plain TCP, without the aliasing an `UnsafeCell` split would need.
//! Records the read side produces (a KeyUpdate answer, an alert) leave with
//! the next write; nothing in our protocol depends on them leaving sooner.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::tcp::{TcpOwnedReadHalf, TcpOwnedWriteHalf};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};

/// Ciphertext read from the socket at once: two full TLS records, so a
/// large frame costs one read per 32 KiB; per connection, so not more.
const CIPHER_READ_BYTES: usize = 32 * 1024;

/// Plaintext one write call encrypts before its ciphertext goes out; the
/// writer task calls again for the rest. Bounds the ciphertext buffer of a
/// connection.
const TLS_WRITE_CHUNK: usize = 256 * 1024;

/// The first byte of a TLS record is its content type: 20 (change cipher
/// spec) to 23 (application data). A handshake starts with 22.
const TLS_CONTENT_TYPES: std::ops::RangeInclusive<u8> = 20..=23;

/// A fatal TLS 1.2 alert record, protocol_version: what a TLS port answers
/// to a plaintext client before closing.
const PROTOCOL_VERSION_ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 70];

/// The DNS name a node's certificate must carry for peers to accept it as
/// node `node_id` of cluster `cluster_id` (a DNS SAN), and the name a peer
/// link verifies when it dials that node.
pub fn peer_server_name(cluster_id: u64, node_id: u64) -> String {
    format!("node-{node_id}.cluster-{cluster_id}")
}

/// Whether the first four bytes of a would-be frame (its length prefix) are
/// really the header of a TLS record: a TLS peer on a plaintext port, or a
/// TLS port answering a plaintext client with an alert. Used to turn an
/// "oversized frame" into the error that names the real cause.
pub fn looks_like_tls_record(header: [u8; 4]) -> bool {
    TLS_CONTENT_TYPES.contains(&header[0]) && header[1] == 3 && header[2] <= 4
}

/// Why a TLS handshake failed, worded for the side that saw it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The handshake did not finish in time.
    #[error("TLS handshake timed out after {0:?}")]
    Timeout(Duration),
    /// We accept TLS and the first bytes were something else.
    #[error(
        "not a TLS handshake (first byte {first:#04x}): a plaintext client or peer on a TLS port"
    )]
    PlaintextClient {
        /// The first byte received.
        first: u8,
    },
    /// We dialed with TLS and the answer was not TLS.
    #[error("the server's answer is not TLS (first byte {first:#04x}): is TLS off on that port?")]
    PlaintextServer {
        /// The first byte received.
        first: u8,
    },
    /// The other side closed the connection before the handshake finished.
    #[error(
        "connection closed during the TLS handshake (a plaintext port drops a TLS hello; \
         a TLS port drops a certificate it refuses)"
    )]
    Closed,
    /// rustls refused the other side (certificate, alert, protocol).
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A TLS setting that cannot be used: a file that cannot be read or holds
/// no certificate or key, or a key that does not match.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {reason}", path.display())]
pub struct TlsConfigError {
    /// What the file should hold.
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file, in order.
pub fn load_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let error = |reason: String| TlsConfigError {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(e.to_string()))?;
    if certificates.is_empty() {
        return Err(error("holds no PEM certificate".into()));
    }
    Ok(certificates)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsConfigError {
        what: "private key",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn root_store(ca_file: &Path) -> Result<Arc<RootCertStore>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for certificate in load_certificates("CA certificate", ca_file)? {
        roots.add(certificate).map_err(|e| TlsConfigError {
            what: "CA certificate",
            path: ca_file.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// A certificate chain and its key, both from PEM files.
#[derive(Clone, Debug)]
pub struct IdentityFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl IdentityFiles {
    fn mismatch(&self, error: rustls::Error) -> TlsConfigError {
        TlsConfigError {
            what: "certificate",
            path: self.cert.clone(),
            reason: format!("unusable with key {}: {error}", self.key.display()),
        }
    }
}

/// The PEM files of one TLS setup, read once: the CA, and the certificate
/// chain and key presented, if any. Every rustls config of a node is built
/// from one of these, so a start or a reload reads each file once.
pub struct TlsMaterial {
    ca_file: PathBuf,
    roots: Arc<RootCertStore>,
    identity: Option<(
        IdentityFiles,
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
    )>,
}

impl TlsMaterial {
    /// Reads `ca_file` and, when given, the identity's certificate and key.
    pub fn load(
        ca_file: &Path,
        identity: Option<&IdentityFiles>,
    ) -> Result<TlsMaterial, TlsConfigError> {
        let identity = match identity {
            None => None,
            Some(files) => Some((
                files.clone(),
                load_certificates("certificate", &files.cert)?,
                load_private_key(&files.key)?,
            )),
        };
        Ok(TlsMaterial {
            ca_file: ca_file.to_path_buf(),
            roots: root_store(ca_file)?,
            identity,
        })
    }

    /// The client side of TLS: trust the CA and present the identity, if
    /// any, when the server asks for a certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsConfigError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(self.roots.clone());
        let mut config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((files, chain, key)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| files.mismatch(e))?,
        };
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// The server side of TLS: present the identity (required here), and
    /// ask for a client certificate that chains to the CA, refusing a
    /// client without one when `require_client_cert`.
    pub fn server_config(
        &self,
        require_client_cert: bool,
    ) -> Result<Arc<ServerConfig>, TlsConfigError> {
        let Some((files, chain, key)) = &self.identity else {
            return Err(TlsConfigError {
                what: "CA certificate",
                path: self.ca_file.clone(),
                reason: "a server needs a certificate and key besides the CA".into(),
            });
        };
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        let verifier = if require_client_cert {
            verifier
        } else {
            verifier.allow_unauthenticated()
        };
        let verifier = verifier.build().map_err(|e| TlsConfigError {
            what: "CA certificate",
            path: self.ca_file.clone(),
            reason: e.to_string(),
        })?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| files.mismatch(e))?;
        // Connections are long-lived and nothing resumes them: tickets would
        // only cost a write after every handshake.
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

/// [`TlsMaterial::client_config`] straight from the files.
pub fn client_config(
    ca_file: &Path,
    identity: Option<&IdentityFiles>,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    TlsMaterial::load(ca_file, identity)?.client_config()
}

/// [`TlsMaterial::server_config`] straight from the files.
pub fn server_config(
    ca_file: &Path,
    identity: &IdentityFiles,
    require_client_cert: bool,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    TlsMaterial::load(ca_file, Some(identity))?.server_config(require_client_cert)
}

/// Whether `certificate` (already verified to chain to the CA) names `name`
/// in its subject alternative names.
pub fn certificate_names(certificate: &CertificateDer<'_>, name: &str) -> Result<(), String> {
    let end_entity = webpki::EndEntityCert::try_from(certificate)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let server_name =
        ServerName::try_from(name).map_err(|e| format!("`{name}` is not a DNS name: {e}"))?;
    end_entity
        .verify_is_valid_for_subject_name(&server_name)
        .map_err(|_| format!("the certificate does not name {name}"))
}

/// The read half of a connection, plain or TLS.
pub enum ReadHalf {
    /// Plain TCP.
    Plain(TcpOwnedReadHalf),
    /// TLS over TCP.
    Tls(TlsReadHalf),
}

/// The write half of a connection, plain or TLS.
pub enum WriteHalf {
    /// Plain TCP.
    Plain(TcpOwnedWriteHalf),
    /// TLS over TCP.
    Tls(TlsWriteHalf),
}

/// The halves of a plaintext connection.
pub fn plain(stream: TcpStream) -> (ReadHalf, WriteHalf) {
    let (read, write) = stream.into_split();
    (ReadHalf::Plain(read), WriteHalf::Plain(write))
}

/// The read side of a TLS connection.
pub struct TlsReadHalf {
    conn: Rc<RefCell<Connection>>,
    tcp: TcpOwnedReadHalf,
    /// Ciphertext read from the socket; `cipher[pos..]` is not yet handed
    /// to rustls (which takes at most about one record per call).
    cipher: Vec<u8>,
    pos: usize,
}

/// The write side of a TLS connection.
pub struct TlsWriteHalf {
    conn: Rc<RefCell<Connection>>,
    tcp: TcpOwnedWriteHalf,
    /// Ciphertext of one write call, reused.
    out: Vec<u8>,
}

fn tls_failure(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TlsError::Tls(error))
}

impl TlsReadHalf {
    /// Plaintext into `dst`; 0 at the end of the stream (a close_notify).
    async fn read_plain(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut conn = self.conn.borrow_mut();
                match conn.reader().read(dst) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // A close without close_notify (a client process that
                    // exits) is an ordinary end here: frames carry their
                    // length, so a cut inside one is still caught as a
                    // truncated frame.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if self.pos < self.cipher.len() {
                    let mut pending = &self.cipher[self.pos..];
                    let before = pending.len();
                    conn.read_tls(&mut pending)?;
                    self.pos += before - pending.len();
                    conn.process_new_packets().map_err(tls_failure)?;
                    continue;
                }
            }
            let mut buf = std::mem::take(&mut self.cipher);
            buf.clear();
            let (result, buf) = self.tcp.read(buf).await;
            self.cipher = buf;
            self.pos = 0;
            if result? == 0 {
                // rustls now answers the next read: Ok(0) after a
                // close_notify, UnexpectedEof after a bare close.
                let mut conn = self.conn.borrow_mut();
                conn.read_tls(&mut io::empty())?;
                conn.process_new_packets().map_err(tls_failure)?;
            }
        }
    }
}

impl TlsWriteHalf {
    /// Encrypts as much of `slices` as one chunk allows and writes it out;
    /// returns the plaintext bytes taken.
    async fn write_plain<'a>(
        &mut self,
        slices: impl IntoIterator<Item = &'a [u8]>,
    ) -> io::Result<usize> {
        let taken = {
            let mut conn = self.conn.borrow_mut();
            let mut taken = 0;
            for slice in slices {
                let n = conn.writer().write(slice)?;
                taken += n;
                if n < slice.len() {
                    break;
                }
            }
            take_output(&mut conn, &mut self.out)?;
            taken
        };
        send(&mut self.tcp, &mut self.out).await?;
        Ok(taken)
    }
}

/// Moves the ciphertext rustls has queued into `out` (cleared first).
fn take_output(conn: &mut Connection, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    Ok(())
}

/// Writes all of `out`, keeping the buffer for the next call.
async fn send(tcp: &mut TcpOwnedWriteHalf, out: &mut Vec<u8>) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let (result, buf) = tcp.write_all(std::mem::take(out)).await;
    *out = buf;
    result.map(|_| ())
}

// SAFETY of the slices below: monoio's buffer traits promise that
// `read_ptr`/`bytes_init` (and the iovecs) describe initialised memory owned
// by the buffer, which we hold for the duration of the call.
fn io_slice<T: IoBuf>(buf: &T) -> &[u8] {
    unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) }
}

fn io_slices<T: IoVecBuf>(buf: &T) -> impl Iterator<Item = &[u8]> {
    let iovecs = unsafe { std::slice::from_raw_parts(buf.read_iovec_ptr(), buf.read_iovec_len()) };
    iovecs.iter().map(|iovec| unsafe {
        std::slice::from_raw_parts(iovec.iov_base as *const u8, iovec.iov_len)
    })
}

impl AsyncReadRent for TlsReadHalf {
    async fn read<T: IoBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        // SAFETY: `write_ptr`/`bytes_total` describe the buffer's capacity,
        // which we fill and then mark initialised up to what was written.
        let dst = unsafe { std::slice::from_raw_parts_mut(buf.write_ptr(), buf.bytes_total()) };
        let result = self.read_plain(dst).await;
        if let Ok(n) = result {
            unsafe { buf.set_init(n) };
        }
        (result, buf)
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        // Only the first iovec is filled: nothing here reads vectored.
        let first = unsafe {
            let iovecs = std::slice::from_raw_parts(buf.write_iovec_ptr(), buf.write_iovec_len());
            iovecs
                .first()
                .map(|iovec| (iovec.iov_base as *mut u8, iovec.iov_len))
        };
        let result = match first {
            Some((ptr, len)) => {
                let dst = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                self.read_plain(dst).await
            }
            None => Ok(0),
        };
        if let Ok(n) = result {
            unsafe { buf.set_init(n) };
        }
        (result, buf)
    }
}

impl AsyncWriteRent for TlsWriteHalf {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        let result = self.write_plain([io_slice(&buf)]).await;
        (result, buf)
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        let result = self.write_plain(io_slices(&buf)).await;
        (result, buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        {
            let mut conn = self.conn.borrow_mut();
            conn.send_close_notify();
            take_output(&mut conn, &mut self.out)?;
        }
        send(&mut self.tcp, &mut self.out).await?;
        self.tcp.shutdown().await
    }
}

impl AsyncReadRent for ReadHalf {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            ReadHalf::Plain(tcp) => tcp.read(buf).await,
            ReadHalf::Tls(tls) => tls.read(buf).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            ReadHalf::Plain(tcp) => tcp.readv(buf).await,
            ReadHalf::Tls(tls) => tls.readv(buf).await,
        }
    }
}

impl AsyncWriteRent for WriteHalf {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            WriteHalf::Plain(tcp) => tcp.write(buf).await,
            WriteHalf::Tls(tls) => tls.write(buf).await,
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            WriteHalf::Plain(tcp) => tcp.writev(buf).await,
            WriteHalf::Tls(tls) => tls.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            WriteHalf::Plain(tcp) => tcp.flush().await,
            WriteHalf::Tls(tls) => tls.flush().await,
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            WriteHalf::Plain(tcp) => tcp.shutdown().await,
            WriteHalf::Tls(tls) => tls.shutdown().await,
        }
    }
}

/// A finished server-side handshake.
pub struct Accepted {
    /// The read half.
    pub read: ReadHalf,
    /// The write half.
    pub write: WriteHalf,
    /// The client's certificate, verified against the CA, if it sent one.
    pub peer_certificate: Option<CertificateDer<'static>>,
}

/// The server side of the TLS handshake on an accepted stream.
pub async fn tls_accept(
    stream: TcpStream,
    config: Arc<ServerConfig>,
    timeout: Duration,
) -> Result<Accepted, TlsError> {
    let conn = ServerConnection::new(config)?;
    let (read, write, conn) = with_timeout(timeout, handshake(stream, conn.into(), true)).await?;
    let peer_certificate = conn
        .borrow()
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|certificate| certificate.clone().into_owned());
    Ok(Accepted {
        read,
        write,
        peer_certificate,
    })
}

/// The client side of the TLS handshake on a connected stream, verifying
/// that the server's certificate names `server_name`.
pub async fn tls_connect(
    stream: TcpStream,
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    timeout: Duration,
) -> Result<(ReadHalf, WriteHalf), TlsError> {
    let conn = ClientConnection::new(config, server_name)?;
    let (read, write, _) = with_timeout(timeout, handshake(stream, conn.into(), false)).await?;
    Ok((read, write))
}

/// The name to verify a server by: an IP address or a DNS name.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|e| format!("`{host}` is not a host name or IP address: {e}"))
}

async fn with_timeout<T>(
    timeout: Duration,
    future: impl std::future::Future<Output = Result<T, TlsError>>,
) -> Result<T, TlsError> {
    monoio::time::timeout(timeout, future)
        .await
        .unwrap_or(Err(TlsError::Timeout(timeout)))
}

type Handshaken = (ReadHalf, WriteHalf, Rc<RefCell<Connection>>);

async fn handshake(
    stream: TcpStream,
    mut conn: Connection,
    server: bool,
) -> Result<Handshaken, TlsError> {
    conn.set_buffer_limit(Some(TLS_WRITE_CHUNK));
    let (mut tcp_read, mut tcp_write) = stream.into_split();
    let mut cipher = Vec::with_capacity(CIPHER_READ_BYTES);
    let mut out = Vec::new();
    let mut pos = 0;
    let mut first = true;
    loop {
        flush(&mut conn, &mut tcp_write, &mut out).await?;
        if !conn.is_handshaking() {
            break;
        }
        if pos == cipher.len() {
            cipher.clear();
            let (result, buf) = tcp_read.read(cipher).await;
            cipher = buf;
            pos = 0;
            if result? == 0 {
                return Err(TlsError::Closed);
            }
            if std::mem::take(&mut first) && !TLS_CONTENT_TYPES.contains(&cipher[0]) {
                let first = cipher[0];
                if !server {
                    return Err(TlsError::PlaintextServer { first });
                }
                // A plaintext client reads this alert as a frame header
                // and says that the port speaks TLS (see
                // `looks_like_tls_record`).
                let (_, _) = tcp_write.write_all(PROTOCOL_VERSION_ALERT.to_vec()).await;
                return Err(TlsError::PlaintextClient { first });
            }
        }
        let mut pending = &cipher[pos..];
        let before = pending.len();
        conn.read_tls(&mut pending)?;
        pos += before - pending.len();
        if let Err(error) = conn.process_new_packets() {
            // rustls queued an alert that names the cause for the other
            // side; it goes out before we give up.
            let _ = flush(&mut conn, &mut tcp_write, &mut out).await;
            return Err(error.into());
        }
    }
    let conn = Rc::new(RefCell::new(conn));
    let read = TlsReadHalf {
        conn: Rc::clone(&conn),
        tcp: tcp_read,
        cipher,
        pos,
    };
    out.clear();
    let write = TlsWriteHalf {
        conn: Rc::clone(&conn),
        tcp: tcp_write,
        out,
    };
    Ok((ReadHalf::Tls(read), WriteHalf::Tls(write), conn))
}

async fn flush(
    conn: &mut Connection,
    tcp: &mut TcpOwnedWriteHalf,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    take_output(conn, out)?;
    send(tcp, out).await
}
