//! Shared argument handling for the peer servers: `PEER ADDR`.

/// The address to listen on: the first argument, default 127.0.0.1:7008.
pub fn addr() -> std::net::SocketAddr {
    std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7008".into())
        .parse()
        .expect("usage: PEER [ADDR]")
}
