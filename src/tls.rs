//! The TLS of every connection this server makes (deliveries to webhooks over https, PostgreSQL
//! when its URL asks): rustls with ring's cryptography, as rustls's own `ring` provider, less
//! what a client of ours never uses, so that its code is not in the binary:
//! - ChaCha20-Poly1305: every TLS 1.3 server implements AES-128-GCM (RFC 8446, 9.1, a "MUST")
//!   and the TLS 1.2 servers rustls can talk to (ECDHE with AEAD) offer AES-GCM; ChaCha20 is
//!   only quicker on a CPU without AES instructions, where a webhook's kilobyte costs a few
//!   microseconds more with AES-GCM.
//! - Client certificates: the server never presents one (`sslcert`/`sslkey` are refused at
//!   start, README "TLS to PostgreSQL"), so no private key is ever loaded.
//!
//! Key exchange (X25519, P-256, P-384), protocol versions (1.3, 1.2) and the certificates'
//! signature algorithms are rustls's defaults for ring.

use std::sync::{Arc, LazyLock};

use rustls::crypto::ring::{cipher_suite, kx_group};
use rustls::crypto::{
    CryptoProvider, GetRandomFailed, KeyProvider, SecureRandom, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::PrivateKeyDer;
use rustls::sign::SigningKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use webpki::ring as alg;

/// A client's TLS set-up checking servers against `roots`, with no certificate of its own.
pub fn client(roots: impl Into<Arc<RootCertStore>>) -> ClientConfig {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
        Arc::new(CryptoProvider {
            cipher_suites: vec![
                // rustls's order.
                cipher_suite::TLS13_AES_256_GCM_SHA384,
                cipher_suite::TLS13_AES_128_GCM_SHA256,
                cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            ],
            kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
            signature_verification_algorithms: SIGNATURES,
            secure_random: &System,
            key_provider: &System,
        })
    });
    ClientConfig::builder_with_provider(PROVIDER.clone())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        // Both versions have cipher suites above and the key exchanges are ring's: the
        // provider is consistent (the unit test below builds it).
        .expect("the provider's suites cover TLS 1.3 and 1.2")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The signature algorithms rustls's `ring` provider checks certificates and handshakes with
/// (its list is not public), in its order.
static SIGNATURES: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
    all: &[
        alg::ECDSA_P256_SHA256,
        alg::ECDSA_P256_SHA384,
        alg::ECDSA_P384_SHA256,
        alg::ECDSA_P384_SHA384,
        alg::ED25519,
        alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
        alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
        alg::RSA_PKCS1_2048_8192_SHA256,
        alg::RSA_PKCS1_2048_8192_SHA384,
        alg::RSA_PKCS1_2048_8192_SHA512,
        alg::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
        alg::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
        alg::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
    ],
    mapping: &[
        // TLS 1.2 does not fix the curve by the scheme; TLS 1.3 does.
        (
            SignatureScheme::ECDSA_NISTP384_SHA384,
            &[alg::ECDSA_P384_SHA384, alg::ECDSA_P256_SHA384],
        ),
        (
            SignatureScheme::ECDSA_NISTP256_SHA256,
            &[alg::ECDSA_P256_SHA256, alg::ECDSA_P384_SHA256],
        ),
        (SignatureScheme::ED25519, &[alg::ED25519]),
        (
            SignatureScheme::RSA_PSS_SHA512,
            &[alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY],
        ),
        (
            SignatureScheme::RSA_PSS_SHA384,
            &[alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY],
        ),
        (
            SignatureScheme::RSA_PSS_SHA256,
            &[alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY],
        ),
        (
            SignatureScheme::RSA_PKCS1_SHA512,
            &[alg::RSA_PKCS1_2048_8192_SHA512],
        ),
        (
            SignatureScheme::RSA_PKCS1_SHA384,
            &[alg::RSA_PKCS1_2048_8192_SHA384],
        ),
        (
            SignatureScheme::RSA_PKCS1_SHA256,
            &[alg::RSA_PKCS1_2048_8192_SHA256],
        ),
    ],
};

/// The operating system's random numbers (as ring's), and no private keys.
#[derive(Debug)]
struct System;

impl SecureRandom for System {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        getrandom::fill(buf).map_err(|_| GetRandomFailed)
    }
}

impl KeyProvider for System {
    fn load_private_key(
        &self,
        _key: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn SigningKey>, rustls::Error> {
        Err(rustls::Error::General(
            "client certificates are not supported".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::ring::default_provider;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::{ClientConnection, ServerConfig, ServerConnection, SupportedCipherSuite};

    /// A handshake in memory between our client and a rustls server for `localhost` (the
    /// delivery tests' certificate) offering `suites` of `versions`: the suite agreed on.
    fn agree(
        suites: Vec<SupportedCipherSuite>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<SupportedCipherSuite, rustls::Error> {
        let ca = include_bytes!("delivery/testdata/ca.pem");
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca).unwrap())
            .unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = ClientConnection::new(Arc::new(super::client(roots)), name).unwrap();
        let provider = CryptoProvider {
            cipher_suites: suites,
            ..default_provider()
        };
        let cert = include_bytes!("delivery/testdata/leaf.pem");
        let key = include_bytes!("delivery/testdata/leaf.key");
        let server = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(cert).unwrap()],
                PrivateKeyDer::from_pem_slice(key).unwrap(),
            )
            .unwrap();
        let mut server = ServerConnection::new(Arc::new(server)).unwrap();
        while client.is_handshaking() || server.is_handshaking() {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut &wire[..]).unwrap();
            server.process_new_packets()?;
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut &wire[..]).unwrap();
            client.process_new_packets()?;
        }
        Ok(client.negotiated_cipher_suite().unwrap())
    }

    #[test]
    fn servers_of_tls_13_and_12_are_reached_with_aes_gcm_and_chacha20_alone_is_refused() {
        use rustls::crypto::ring::cipher_suite as s;
        let all = || default_provider().cipher_suites;
        let tls13 = agree(all(), &[&rustls::version::TLS13]).unwrap();
        assert_eq!(tls13.suite(), s::TLS13_AES_256_GCM_SHA384.suite());
        // The test certificate's key is ECDSA.
        let tls12 = agree(all(), &[&rustls::version::TLS12]).unwrap();
        assert_eq!(
            tls12.suite(),
            s::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384.suite()
        );
        // A server that offers only ChaCha20-Poly1305 (none known: AES-128-GCM is a must of TLS
        // 1.3) gets no handshake.
        let chacha = vec![s::TLS13_CHACHA20_POLY1305_SHA256];
        let refused = agree(chacha, &[&rustls::version::TLS13]).unwrap_err();
        assert!(
            refused.to_string().contains("NoCipherSuitesInCommon"),
            "{refused}"
        );
        let mut random = [0u8; 32];
        let config = client(RootCertStore::empty());
        config
            .crypto_provider()
            .secure_random
            .fill(&mut random)
            .unwrap();
        assert_ne!(random, [0u8; 32]);
    }
}
