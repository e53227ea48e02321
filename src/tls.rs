//! TLS with rustls (ring provider): `wss://` without a proxy, with the
//! certificate chain and key from `server.tls`; and `amqps://` to the
//! broker, with `amqp.tls`.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{AmqpTlsConfig, TlsConfig};

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

/// The rustls configuration for `amqps://`: the system's CA certificates
/// plus `amqp.tls.ca_file`, and the client certificate when one is set.
pub fn amqp_client_config(tls: &AmqpTlsConfig) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if !tls.ca_file.is_empty() {
        let certs = CertificateDer::pem_file_iter(&tls.ca_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("amqp.tls.ca_file {:?}: {e}", tls.ca_file))?;
        if certs.is_empty() {
            return Err(format!(
                "amqp.tls.ca_file {:?}: no certificate in it",
                tls.ca_file
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("amqp.tls.ca_file {:?}: {e}", tls.ca_file))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match (tls.cert_file.is_empty(), tls.key_file.is_empty()) {
        (true, true) => builder.with_no_client_auth(),
        (false, false) => {
            let certs = CertificateDer::pem_file_iter(&tls.cert_file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("amqp.tls.cert_file {:?}: {e}", tls.cert_file))?;
            let key = PrivateKeyDer::from_pem_file(&tls.key_file)
                .map_err(|e| format!("amqp.tls.key_file {:?}: {e}", tls.key_file))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("amqp.tls: certificate and key do not fit: {e}"))?
        }
        _ => return Err("set both amqp.tls.cert_file and amqp.tls.key_file, or neither".into()),
    };
    Ok(Arc::new(config))
}
