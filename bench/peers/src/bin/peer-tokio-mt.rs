//! The canonical tokio echo server on the multi-thread runtime (one worker per CPU): a task per connection,
//! a 4 KiB buffer, read then write_all.
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let listener = tokio::net::TcpListener::bind(echoport_peers::addr()).await.unwrap();
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
