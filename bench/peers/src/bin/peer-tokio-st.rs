//! The canonical tokio echo server ([`echoport_peers::tokio_echo`]) on the current-thread
//! runtime.

#[tokio::main(flavor = "current_thread")]
async fn main() {
    echoport_peers::tokio_echo().await
}
