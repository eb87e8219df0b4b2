//! The echo server most tokio users would write: one current-thread runtime (the same one
//! core as the other servers in the comparison), a task per connection, read into a
//! buffer, `write_all` it back. TCP_NODELAY, like echoport.
//!
//! usage: tokio-echo [PORT]   (default 0: an ephemeral port on 127.0.0.1)

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() {
    let port: u16 = std::env::args().nth(1).map_or(0, |p| p.parse().expect("port"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind");
        eprintln!("listening on {}", listener.local_addr().expect("address"));
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let _ = sock.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    let n = match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if sock.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}
