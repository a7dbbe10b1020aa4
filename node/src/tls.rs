//! The node's TLS material: read from `tls_cert_file`, `tls_key_file` and
//! `tls_ca_file` at start, and again on SIGHUP. A connection takes the
//! configs current when it starts, so a reload changes new connections only.

use std::sync::{Arc, RwLock};

use corekv_transport::rustls::{ClientConfig, ServerConfig};
use corekv_transport::{
    certificate_names, peer_server_name, IdentityFiles, PeerTls, TlsConfigError, TlsMaterial,
};

use crate::config::{ClientAuth, Config};

/// The three rustls configs one node uses.
pub struct TlsConfigs {
    /// The client port: a client certificate is required with
    /// `client_auth = cert`, else optional.
    pub clients: Arc<ServerConfig>,
    /// The peer port: a certificate naming the peer is always required.
    pub peers: Arc<ServerConfig>,
    /// Dialing peers (and the members a joining node asks), presenting
    /// this node's certificate.
    pub dial: Arc<ClientConfig>,
    /// The admin HTTPS port: a client certificate is required with
    /// `admin_client_auth = cert`, else optional.
    pub admin: Arc<ServerConfig>,
}

/// Which clients must present a certificate.
#[derive(Clone, Copy)]
struct Required {
    clients: bool,
    admin: bool,
}

/// This node's TLS files and the configs last read from them.
pub struct NodeTls {
    identity: IdentityFiles,
    ca_file: std::path::PathBuf,
    required: Required,
    cluster_id: u64,
    current: RwLock<Arc<TlsConfigs>>,
}

impl NodeTls {
    /// The node's TLS, or `None` when the config leaves TLS off. Fails on a
    /// file that cannot be read or a key that does not match.
    pub fn load(config: &Config) -> Result<Option<Arc<NodeTls>>, TlsConfigError> {
        let (Some(cert), Some(key), Some(ca_file)) = (
            &config.tls_cert_file,
            &config.tls_key_file,
            &config.tls_ca_file,
        ) else {
            return Ok(None);
        };
        let identity = IdentityFiles {
            cert: cert.clone(),
            key: key.clone(),
        };
        let required = Required {
            clients: config.client_auth == ClientAuth::Cert,
            admin: config.admin_client_auth == ClientAuth::Cert,
        };
        let configs = read_files(&identity, ca_file, required)?;
        Ok(Some(Arc::new(NodeTls {
            identity,
            ca_file: ca_file.clone(),
            required,
            cluster_id: config.cluster_id,
            current: RwLock::new(Arc::new(configs)),
        })))
    }

    /// The configs for a connection starting now.
    pub fn current(&self) -> Arc<TlsConfigs> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Reads the files again; on failure the configs in use stay.
    pub fn reload(&self) -> Result<(), TlsConfigError> {
        let fresh = Arc::new(read_files(&self.identity, &self.ca_file, self.required)?);
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh;
        Ok(())
    }

    /// TLS for dialing `peer`: its certificate must name it.
    pub fn peer_tls(self: &Arc<Self>, peer: u64) -> PeerTls {
        let name = peer_server_name(self.cluster_id, peer);
        let tls = Arc::clone(self);
        PeerTls {
            config: Arc::new(move || tls.current().dial.clone()),
            server_name: corekv_transport::server_name(&name)
                .expect("node-N.cluster-C is a DNS name"),
        }
    }

    /// Checks that an inbound peer's certificate (verified against the CA
    /// by the handshake) names the node id its Hello claims. On a mismatch
    /// the error names the member the certificate belongs to, if it is one
    /// of `members`.
    pub fn check_peer_identity(
        &self,
        certificate: Option<&corekv_transport::rustls::pki_types::CertificateDer<'_>>,
        claimed: u64,
        members: &[u64],
    ) -> Result<(), String> {
        let Some(certificate) = certificate else {
            return Err("no client certificate".to_string());
        };
        let expected = peer_server_name(self.cluster_id, claimed);
        certificate_names(certificate, &expected).map_err(|reason| {
            let owner = members.iter().find(|id| {
                certificate_names(certificate, &peer_server_name(self.cluster_id, **id)).is_ok()
            });
            match owner {
                Some(owner) => {
                    format!("claims node {claimed} with the certificate of node {owner} ({reason})")
                }
                None => format!("claims node {claimed}: {reason}"),
            }
        })
    }
}

fn read_files(
    identity: &IdentityFiles,
    ca_file: &std::path::Path,
    required: Required,
) -> Result<TlsConfigs, TlsConfigError> {
    let material = TlsMaterial::load(ca_file, Some(identity))?;
    Ok(TlsConfigs {
        clients: material.server_config(required.clients)?,
        peers: material.server_config(true)?,
        dial: material.client_config()?,
        admin: material.server_config(required.admin)?,
    })
}
