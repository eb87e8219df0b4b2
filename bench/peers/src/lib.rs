//! Shared parts of the peer servers: `PEER ADDR` argument handling, and the tokio echo that
//! the two tokio peers run on their two runtimes.

/// The address to listen on: the first argument, default 127.0.0.1:7008.
pub fn addr() -> std::net::SocketAddr {
    std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7008".into())
        .parse()
        .expect("usage: PEER [ADDR]")
}

/// The canonical tokio echo server, on whichever runtime the caller's `main` starts: a task
/// per connection, a 4 KiB buffer, read then `write_all`; says "listening on ADDR" on stderr.
pub async fn tokio_echo() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr()).await.unwrap();
    eprintln!("listening on {}", listener.local_addr().unwrap());
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let _ = sock.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if sock.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}
