//! The process's one TLS crypto provider. reqwest (the API, handlers, the archive's downloads
//! and S3) and tokio-postgres (a PostgreSQL store over TLS) all build on rustls, which is built
//! without a default provider: whichever starts first installs *ring*, here, below every room
//! that makes a TLS connection.

/// Installs rustls' *ring* provider once per process (reqwest is built without a default one to
/// keep aws-lc's long C build out of the dependency tree).
pub fn install_crypto_provider() {
    // Fails only if a provider is already installed, which is what we want anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
