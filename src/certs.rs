//! Throwaway certificates for `corekv dev --tls` and for tests: a
//! self-signed CA and the node and client certificates it issues (ECDSA
//! P-256, made with rcgen).
//!
//! Never for production: [`write_dev_pki`] leaves the CA's private key next
//! to the certificates, so whoever can read that directory can issue
//! certificates the cluster trusts.
//!
//! # The SAN rule
//!
//! A node certificate carries the DNS name
//! [`peer_server_name`]`(cluster_id, node_id)`, `node-<id>.cluster-<c>`: a
//! peer accepts a certificate as node `id` only if it names that, so one
//! node's certificate cannot stand in for another's. It also carries every
//! host clients dial the node by (an IP address SAN for an address, a DNS
//! SAN otherwise), since clients check the host they dialled.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use corekv_transport::peer_server_name;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

/// Issued certificates start this long before they are made, so that a
/// machine whose clock is a little behind the issuer's accepts them.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// Lifetime of a node or client certificate.
const VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Lifetime of the CA: longer than what it issues, so that a certificate
/// issued late in a dev directory's life does not outlive its issuer.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// A self-signed certificate authority and its key.
pub struct Authority {
    cert: Certificate,
    key: KeyPair,
}

/// A certificate and its private key, both PEM (the key PKCS#8).
pub struct Issued {
    /// The certificate alone (no chain: the CA is the only issuer).
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl Authority {
    /// A new CA with a fresh key, named `common_name`.
    pub fn new(common_name: &str) -> anyhow::Result<Authority> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_only(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        set_validity(&mut params, ago(now, BACKDATE)?, later(now, CA_VALIDITY)?)?;
        let cert = params
            .self_signed(&key)
            .with_context(|| format!("cannot self-sign the CA certificate {common_name:?}"))?;
        Ok(Authority { cert, key })
    }

    /// The CA certificate, PEM: what nodes and clients trust.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA's private key, PEM (PKCS#8).
    fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate for node `node_id` of cluster `cluster_id`, valid from
    /// an hour ago for a year, for server and client authentication (a node
    /// serves clients and peers, and is a client when it dials a peer). It
    /// names `node-<node_id>.cluster-<cluster_id>` and each of `hosts`.
    pub fn node(&self, cluster_id: u64, node_id: u64, hosts: &[String]) -> anyhow::Result<Issued> {
        let now = SystemTime::now();
        self.node_with_validity(
            cluster_id,
            node_id,
            hosts,
            ago(now, BACKDATE)?,
            later(now, VALIDITY)?,
        )
    }

    /// [`Authority::node`] valid from `not_before` to `not_after` (whole
    /// seconds), for tests of expired and not-yet-valid certificates.
    pub fn node_with_validity(
        &self,
        cluster_id: u64,
        node_id: u64,
        hosts: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> anyhow::Result<Issued> {
        let own_name = peer_server_name(cluster_id, node_id);
        let mut names = vec![dns_name(&own_name)?];
        for host in hosts {
            let name = host_name(host)
                .with_context(|| format!("node {node_id}: host {host:?} cannot be named"))?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let mut params = leaf_params(&format!("corekv node {node_id}"));
        params.subject_alt_names = names;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        set_validity(&mut params, not_before, not_after)?;
        self.issue(params)
            .with_context(|| format!("cannot issue the certificate of node {node_id}"))
    }

    /// A client certificate named `name` (its common name), valid from an
    /// hour ago for a year, for client authentication only.
    pub fn client(&self, name: &str) -> anyhow::Result<Issued> {
        let mut params = leaf_params(name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = SystemTime::now();
        set_validity(&mut params, ago(now, BACKDATE)?, later(now, VALIDITY)?)?;
        self.issue(params)
            .with_context(|| format!("cannot issue the client certificate {name:?}"))
    }

    fn issue(&self, params: CertificateParams) -> anyhow::Result<Issued> {
        let key = new_key()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn new_key() -> anyhow::Result<KeyPair> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("cannot generate an ECDSA P-256 key")
}

fn common_name_only(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// Parameters every end-entity certificate shares.
fn leaf_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name_only(common_name);
    // Stricter X.509 checkers (OpenSSL's X509_STRICT, on by default in
    // Python 3.13) want an explicit CA:false and an authority key id.
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params
}

fn dns_name(name: &str) -> anyhow::Result<SanType> {
    let ia5 = name
        .to_string()
        .try_into()
        .with_context(|| format!("{name:?} is not an ASCII DNS name"))?;
    Ok(SanType::DnsName(ia5))
}

/// An IP address SAN for an address (bracketed IPv6 too, as in `[::1]:7100`),
/// else a DNS SAN.
fn host_name(host: &str) -> anyhow::Result<SanType> {
    if host.is_empty() {
        bail!("a host is empty");
    }
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(host);
    match unbracketed.parse::<IpAddr>() {
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => dns_name(host),
    }
}

fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> anyhow::Result<()> {
    params.not_before = x509_time(not_before)?;
    params.not_after = x509_time(not_after)?;
    Ok(())
}

/// `time` in the range X.509 can encode (years 0 to 9999), to the second.
fn x509_time(time: SystemTime) -> anyhow::Result<OffsetDateTime> {
    let seconds = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).ok(),
        Err(before) => i64::try_from(before.duration().as_secs())
            .ok()
            .map(|seconds| -seconds),
    };
    let converted = seconds.and_then(|seconds| OffsetDateTime::from_unix_timestamp(seconds).ok());
    match converted {
        // rcgen encodes a year outside this range by panicking.
        Some(date) if (0..=9999).contains(&date.year()) => Ok(date),
        _ => bail!("{time:?} is outside the years 0 to 9999 a certificate can hold"),
    }
}

fn ago(now: SystemTime, by: Duration) -> anyhow::Result<SystemTime> {
    now.checked_sub(by)
        .with_context(|| format!("{now:?} minus {by:?} is out of range"))
}

fn later(now: SystemTime, by: Duration) -> anyhow::Result<SystemTime> {
    now.checked_add(by)
        .with_context(|| format!("{now:?} plus {by:?} is out of range"))
}

/// Where a dev PKI's files live in its directory; see [`write_dev_pki`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevPki {
    /// The directory all the files are in.
    pub dir: PathBuf,
    /// The CA certificate (`ca.pem`): `tls_ca_file` of every node, and what
    /// clients trust.
    pub ca: PathBuf,
    /// A client certificate (`client.pem`) the nodes accept.
    pub client_cert: PathBuf,
    /// Its key (`client-key.pem`).
    pub client_key: PathBuf,
}

impl DevPki {
    /// The layout of a dev PKI in `dir`; reads and writes nothing. The paths
    /// are absolute if `dir` is.
    pub fn in_dir(dir: &Path) -> DevPki {
        DevPki {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }

    /// The CA's private key (`ca-key.pem`), kept to issue more certificates
    /// by hand.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }

    /// Node `id`'s certificate (`node<id>.pem`).
    pub fn node_cert(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node{id}.pem"))
    }

    /// Node `id`'s key (`node<id>-key.pem`).
    pub fn node_key(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node{id}-key.pem"))
    }

    /// Every file of a PKI for `node_ids`, the CA certificate last.
    fn files(&self, node_ids: impl IntoIterator<Item = u64>) -> Vec<PathBuf> {
        let mut files = vec![
            self.ca_key(),
            self.client_cert.clone(),
            self.client_key.clone(),
        ];
        for id in node_ids {
            files.push(self.node_cert(id));
            files.push(self.node_key(id));
        }
        files.push(self.ca.clone());
        files
    }
}

/// Writes a dev PKI under `dir` (created if missing): `ca.pem`,
/// `ca-key.pem`, `node<id>.pem` and `node<id>-key.pem` for each of `nodes`
/// (its id and the hosts clients dial it by), `client.pem` and
/// `client-key.pem`; keys are mode 0600.
///
/// If every one of those files already exists, all are kept as they are: a
/// restarted `corekv dev` keeps its certificates, as it keeps its configs.
/// If any is missing (a new node, an interrupted first run), everything is
/// written anew with a new CA, since a kept CA key could not be read back to
/// sign the missing certificates; the paths stay the same, so configs that
/// name them stay valid.
pub fn write_dev_pki(
    dir: &Path,
    cluster_id: u64,
    nodes: &[(u64, Vec<String>)],
) -> anyhow::Result<DevPki> {
    let pki = DevPki::in_dir(dir);
    let files = pki.files(nodes.iter().map(|(id, _)| *id));
    if files.iter().all(|file| file.exists()) {
        return Ok(pki);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = Authority::new(&format!("corekv dev CA, cluster {cluster_id}"))?;
    let client = ca.client("corekv dev client")?;
    write_file(&pki.ca_key(), &ca.key_pem(), Secret::Yes)?;
    write_file(&pki.client_cert, &client.cert_pem, Secret::No)?;
    write_file(&pki.client_key, &client.key_pem, Secret::Yes)?;
    for (id, hosts) in nodes {
        let node = ca.node(cluster_id, *id, hosts)?;
        write_file(&pki.node_cert(*id), &node.cert_pem, Secret::No)?;
        write_file(&pki.node_key(*id), &node.key_pem, Secret::Yes)?;
    }
    // Last, with the others complete: any file that exists was written whole
    // (see write_file), so an interrupted run is noticed as a missing file.
    write_file(&pki.ca, &ca.cert_pem(), Secret::No)?;
    Ok(pki)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Secret {
    Yes,
    No,
}

/// Writes `text` to `path` through a temporary file and a rename, so `path`
/// is either whole or absent; a secret is readable by its owner alone from
/// the moment it is created.
fn write_file(path: &Path, text: &str, secret: Secret) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    // A leftover of an interrupted run may have another mode; create_new
    // below applies ours.
    match std::fs::remove_file(&temporary) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", temporary.display()));
        }
        _ => {}
    }
    let mode = if secret == Secret::Yes { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .with_context(|| format!("cannot create {}", temporary.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| {
        format!(
            "cannot rename {} to {}",
            temporary.display(),
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use webpki::{EndEntityCert, KeyUsage};

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate")
    }

    /// Checks `cert` as rustls would: chains to `ca` at `at`, for `usage`.
    fn verify(
        ca: &Authority,
        cert: &Issued,
        at: SystemTime,
        usage: KeyUsage,
    ) -> Result<(), webpki::Error> {
        let ca_der = der(&ca.cert_pem());
        let anchors = [webpki::anchor_from_trusted_cert(&ca_der)?];
        let cert_der = der(&cert.cert_pem);
        let end_entity = EndEntityCert::try_from(&cert_der)?;
        let at = UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).unwrap());
        end_entity
            .verify_for_usage(
                &[webpki::ring::ECDSA_P256_SHA256],
                &anchors,
                &[],
                at,
                usage,
                None,
                None,
            )
            .map(|_| ())
    }

    fn valid_for(cert: &Issued, name: &str) -> bool {
        let cert_der = der(&cert.cert_pem);
        let end_entity = EndEntityCert::try_from(&cert_der).unwrap();
        let name = ServerName::try_from(name.to_string()).unwrap();
        end_entity.verify_is_valid_for_subject_name(&name).is_ok()
    }

    fn hosts() -> Vec<String> {
        vec!["127.0.0.1".to_string(), "db.example".to_string()]
    }

    #[test]
    fn a_node_certificate_names_its_node_and_hosts_and_chains_to_the_ca() {
        let ca = Authority::new("test CA").unwrap();
        let node = ca.node(7, 2, &hosts()).unwrap();
        let now = SystemTime::now();
        verify(&ca, &node, now, KeyUsage::server_auth()).unwrap();
        verify(&ca, &node, now, KeyUsage::client_auth()).unwrap();
        assert!(valid_for(&node, "node-2.cluster-7"));
        assert!(valid_for(&node, "127.0.0.1"));
        assert!(valid_for(&node, "db.example"));
        // Another node's name, or this node's in another cluster, must fail:
        // that is what stops one node impersonating another.
        assert!(!valid_for(&node, "node-3.cluster-7"));
        assert!(!valid_for(&node, "node-2.cluster-8"));
        assert!(!valid_for(&node, "127.0.0.2"));
        PrivateKeyDer::from_pem_slice(node.key_pem.as_bytes()).unwrap();
    }

    #[test]
    fn a_certificate_of_another_ca_does_not_chain() {
        let ca = Authority::new("test CA").unwrap();
        let other = Authority::new("test CA").unwrap();
        let node = other.node(1, 1, &[]).unwrap();
        assert!(verify(&ca, &node, SystemTime::now(), KeyUsage::server_auth()).is_err());
    }

    #[test]
    fn an_expired_certificate_fails_verification_now() {
        let ca = Authority::new("test CA").unwrap();
        let now = SystemTime::now();
        let expired = ca
            .node_with_validity(1, 1, &hosts(), now - 2 * DAY, now - DAY)
            .unwrap();
        let error = verify(&ca, &expired, now, KeyUsage::server_auth()).unwrap_err();
        assert!(
            matches!(error, webpki::Error::CertExpired { .. }),
            "{error:?}"
        );
        // The same certificate was fine while it was valid, so it is the
        // date that fails, not the certificate.
        verify(&ca, &expired, now - DAY - DAY / 2, KeyUsage::server_auth()).unwrap();
        let early = ca
            .node_with_validity(1, 1, &hosts(), now + DAY, now + 2 * DAY)
            .unwrap();
        let error = verify(&ca, &early, now, KeyUsage::server_auth()).unwrap_err();
        assert!(
            matches!(error, webpki::Error::CertNotValidYet { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn a_client_certificate_is_for_client_auth_only() {
        let ca = Authority::new("test CA").unwrap();
        let client = ca.client("alice").unwrap();
        let now = SystemTime::now();
        verify(&ca, &client, now, KeyUsage::client_auth()).unwrap();
        assert!(verify(&ca, &client, now, KeyUsage::server_auth()).is_err());
        PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap();
    }

    #[test]
    fn hosts_that_cannot_be_named_are_refused() {
        let ca = Authority::new("test CA").unwrap();
        assert!(ca.node(1, 1, &[String::new()]).is_err());
        assert!(ca.node(1, 1, &["höst".to_string()]).is_err());
        let v6 = ca.node(1, 1, &["[::1]".to_string()]).unwrap();
        assert!(valid_for(&v6, "::1"));
    }

    #[test]
    fn dev_pki_is_written_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let nodes = vec![(1, hosts()), (2, hosts())];
        let pki = write_dev_pki(&tls, 3, &nodes).unwrap();
        assert_eq!(pki, DevPki::in_dir(&tls));
        for file in pki.files([1, 2]) {
            assert!(file.exists(), "{}", file.display());
        }
        for key in [pki.ca_key(), pki.client_key.clone(), pki.node_key(1)] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
        let read = |path: &Path| std::fs::read_to_string(path).unwrap();
        let ca = read(&pki.ca);
        let node2 = read(&pki.node_cert(2));

        // The files chain as they should, read back from disk.
        let ca_der = der(&ca);
        let anchors = [webpki::anchor_from_trusted_cert(&ca_der).unwrap()];
        let now = UnixTime::now();
        for (cert, usage) in [
            (pki.node_cert(2), KeyUsage::server_auth()),
            (pki.client_cert.clone(), KeyUsage::client_auth()),
        ] {
            let cert_der = der(&read(&cert));
            EndEntityCert::try_from(&cert_der)
                .unwrap()
                .verify_for_usage(
                    &[webpki::ring::ECDSA_P256_SHA256],
                    &anchors,
                    &[],
                    now,
                    usage,
                    None,
                    None,
                )
                .unwrap();
        }

        write_dev_pki(&tls, 3, &nodes).unwrap();
        assert_eq!(read(&pki.ca), ca, "a complete PKI is kept");
        assert_eq!(read(&pki.node_cert(2)), node2);

        std::fs::remove_file(pki.node_key(1)).unwrap();
        write_dev_pki(&tls, 3, &nodes).unwrap();
        assert_ne!(read(&pki.ca), ca, "an incomplete PKI is replaced");
        assert!(pki.node_key(1).exists());
        let leftovers: Vec<_> = std::fs::read_dir(&tls)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .filter(|name| name.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
