//! TLS termination with rustls (ring provider): TLS 1.2 and 1.3, ALPN h2 and http/1.1, and one
//! certificate per name chosen by SNI from pairs that can be re-read at run time.

pub mod reload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, version};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::TlsAcceptor;

/// A certificate chain file and its private key file, both PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate/key pair given")]
    NoPairs,
    #[error("{path}: {source}", path = path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: no CERTIFICATE block", path = path.display())]
    NoCertificate { path: PathBuf },
    #[error("{path}: unusable private key: {source}", path = path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{key} does not belong to {cert}: {source}", key = key.display(), cert = cert.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loaded pairs, the first being the default for clients that send no (or an unknown) SNI.
#[derive(Debug)]
struct CertStore {
    keys: Vec<Arc<CertifiedKey>>,
}

/// Picks the certificate for each handshake from the current store.
#[derive(Debug)]
pub struct SniResolver {
    pairs: Vec<CertPair>,
    store: ArcSwap<CertStore>,
}

impl SniResolver {
    /// Reads every pair; any unreadable or mismatched pair is an error.
    pub fn load(pairs: Vec<CertPair>) -> Result<Arc<Self>, TlsError> {
        let store = load_store(&pairs)?;
        Ok(Arc::new(Self {
            pairs,
            store: ArcSwap::from_pointee(store),
        }))
    }

    /// Reads the files again; on error the certificates in use stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let store = load_store(&self.pairs)?;
        self.store.store(Arc::new(store));
        Ok(())
    }

    pub fn pairs(&self) -> &[CertPair] {
        &self.pairs
    }

    /// A TLS acceptor for client connections, using this resolver.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&version::TLS13, &version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let store = self.store.load();
        let default = store.keys.first()?;
        let Some(name) = hello
            .server_name()
            .and_then(|n| ServerName::try_from(n).ok())
        else {
            return Some(default.clone());
        };
        // A few pairs at most: checking each certificate's names per handshake is cheaper
        // than keeping our own copy of X.509 name matching.
        let matching = store.keys.iter().find(|key| {
            key.end_entity_cert().is_ok_and(|der| {
                webpki::EndEntityCert::try_from(der)
                    .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
            })
        });
        Some(matching.unwrap_or(default).clone())
    }
}

fn load_store(pairs: &[CertPair]) -> Result<CertStore, TlsError> {
    if pairs.is_empty() {
        return Err(TlsError::NoPairs);
    }
    let provider = provider();
    let keys = pairs
        .iter()
        .map(|pair| load_pair(pair, &provider).map(Arc::new))
        .collect::<Result<_, _>>()?;
    Ok(CertStore { keys })
}

fn load_pair(pair: &CertPair, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    fn pem(path: &Path) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError + '_ {
        move |source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        }
    }
    let chain = CertificateDer::pem_file_iter(&pair.cert)
        .map_err(pem(&pair.cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem(&pair.cert))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: pair.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&pair.key).map_err(pem(&pair.key))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::Key {
            path: pair.key.clone(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|source| TlsError::Mismatch {
            cert: pair.cert.clone(),
            key: pair.key.clone(),
            source,
        })?;
    Ok(certified)
}
