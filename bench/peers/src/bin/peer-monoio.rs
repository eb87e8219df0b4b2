//! monoio's echo server on its io_uring driver, as its own examples write it: owned
//! buffers, read then write_all, a task per connection.
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpListener;

#[monoio::main(driver = "io_uring", entries = 4096)]
async fn main() {
    let listener = TcpListener::bind(echoport_peers::addr()).unwrap();
    eprintln!("listening on {}", listener.local_addr().unwrap());
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let _ = sock.set_nodelay(true);
        monoio::spawn(async move {
            let mut buf: Vec<u8> = Vec::with_capacity(4096);
            loop {
                let (res, b) = sock.read(buf).await;
                buf = b;
                match res {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let (res, b) = sock.write_all(buf).await;
                buf = b;
                if res.is_err() {
                    return;
                }
                buf.clear();
            }
        });
    }
}
