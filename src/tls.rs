//! `wss://` without a proxy: rustls (ring provider) with the certificate
//! chain and key from `server.tls`.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::config::TlsConfig;

/// The rustls configuration for `server.tls`, or None when it is off.
pub fn server_config(tls: &TlsConfig) -> Result<Option<Arc<ServerConfig>>, String> {
    match (tls.cert.is_empty(), tls.key.is_empty()) {
        (true, true) => return Ok(None),
        (false, false) => {}
        _ => return Err("set both server.tls.cert and server.tls.key, or neither".into()),
    }
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("server.tls.cert {:?}: {e}", tls.cert))?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls.cert {:?}: no certificate in it",
            tls.cert
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| format!("server.tls.key {:?}: {e}", tls.key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("server.tls: certificate and key do not fit: {e}"))?;
    // WebSocket upgrades are HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}
