//! Just enough HTTP/1.x for a scrape: one non-blocking connection's request heads in,
//! answers out, keep-alive bounded, every step under a deadline.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use super::render::{self, Source};

/// The content type current Prometheus requires (it refuses scrapes without it).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";
/// How long a request head may take to arrive (from the connection, or the last answer),
/// and an answer to be taken.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Requests one connection may make before it is closed (keep-alive is bounded).
pub const MAX_REQUESTS: usize = 1000;

/// One scrape connection.
pub struct Conn {
    pub stream: TcpStream,
    /// Request bytes not yet answered.
    buf: Vec<u8>,
    /// The answer being written, and how much of it is out.
    out: Vec<u8>,
    sent: usize,
    /// Close once `out` is written.
    close_after: bool,
    served: usize,
    /// The client shut down its sending side: answer what is complete, then close.
    eof: bool,
    pub deadline: Instant,
}

/// What a connection wants next.
#[derive(Debug, PartialEq, Eq)]
pub enum Want {
    Read,
    Write,
    Close,
}

impl Conn {
    pub fn new(stream: TcpStream, now: Instant) -> io::Result<Conn> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
            out: Vec::new(),
            sent: 0,
            close_after: false,
            served: 0,
            eof: false,
            deadline: now + REQUEST_TIMEOUT,
        })
    }

    /// Whether it waits to read or to write.
    pub fn wants(&self) -> Want {
        if self.sent < self.out.len() {
            Want::Write
        } else {
            Want::Read
        }
    }

    /// Does what the connection is ready for; returns what it wants next.
    pub fn step(&mut self, src: &Source, now: Instant) -> Want {
        let result = match self.wants() {
            Want::Write => self.write(now),
            _ => self.read(),
        };
        let want = result.unwrap_or(Want::Close);
        if want == Want::Read && self.out.is_empty() {
            return self.answer_buffered(src, now);
        }
        want
    }

    /// Reads what the socket has, up to a head's worth.
    fn read(&mut self) -> io::Result<Want> {
        let mut chunk = [0u8; 2048];
        loop {
            let room = MAX_HEAD.saturating_sub(self.buf.len()).min(chunk.len());
            if room == 0 {
                return Ok(Want::Read);
            }
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(Want::Read);
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Want::Read),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes what is left of the answer; then closes, or waits for the next request.
    fn write(&mut self, now: Instant) -> io::Result<Want> {
        while self.sent < self.out.len() {
            match self.stream.write(&self.out[self.sent..]) {
                Ok(0) => return Ok(Want::Close),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Want::Write),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.sent = 0;
        if self.close_after {
            let _ = self.stream.shutdown(Shutdown::Write);
            return Ok(Want::Close);
        }
        self.deadline = now + REQUEST_TIMEOUT;
        Ok(Want::Read)
    }

    /// Answers the request at the front of `buf` if it is complete (a pipelined one too).
    fn answer_buffered(&mut self, src: &Source, now: Instant) -> Want {
        let Some(end) = head_end(&self.buf) else {
            if self.buf.len() >= MAX_HEAD {
                return self.queue("431 Request Header Fields Too Large", "", true, true, now);
            }
            return if self.eof { Want::Close } else { Want::Read };
        };
        let head: Vec<u8> = self.buf.drain(..end).collect();
        let Some(req) = std::str::from_utf8(&head).ok().and_then(parse) else {
            return self.queue("400 Bad Request", "", true, true, now);
        };
        self.served += 1;
        let close = req.close || self.served >= MAX_REQUESTS;
        let with_body = req.method != "HEAD";
        match (req.method.as_str(), req.path.as_str()) {
            ("GET" | "HEAD", "/metrics") => {
                let body = render::render(src);
                self.queue("200 OK", &body, close, with_body, now)
            }
            ("GET" | "HEAD", _) => {
                let body = "not found: the metrics are at /metrics\n";
                self.queue("404 Not Found", body, close, with_body, now)
            }
            _ => self.queue("405 Method Not Allowed", "", true, true, now),
        }
    }

    /// Queues an answer and starts writing it.
    fn queue(
        &mut self,
        status: &str,
        body: &str,
        close: bool,
        with_body: bool,
        now: Instant,
    ) -> Want {
        let close = close || self.eof;
        let connection = if close { "close" } else { "keep-alive" };
        self.out = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\n\
             Connection: {connection}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if with_body {
            self.out.extend_from_slice(body.as_bytes());
        }
        self.sent = 0;
        self.close_after = close;
        self.deadline = now + REQUEST_TIMEOUT;
        self.write(now).unwrap_or(Want::Close)
    }
}

/// One request, as far as this endpoint cares.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// The client asked to close, spoke HTTP/1.0 without keep-alive, or sent a body.
    pub close: bool,
}

/// Where the head in `buf` ends (just past its blank line), if it is complete.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses a request line and the headers that matter (`Connection`, a body's length).
pub fn parse(head: &str) -> Option<Request> {
    let mut lines = head.lines();
    let mut parts = lines.next()?.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || method.is_empty() || !target.starts_with('/') {
        return None;
    }
    let mut close = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return None,
    };
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let (name, value) = line.split_once(':')?;
        let (name, value) = (
            name.trim().to_ascii_lowercase(),
            value.trim().to_ascii_lowercase(),
        );
        match name.as_str() {
            "connection" if value.contains("close") => close = true,
            "connection" if value.contains("keep-alive") => close = false,
            // A body is never read; answering and closing keeps the stream in step.
            "content-length" if value != "0" => close = true,
            "transfer-encoding" => close = true,
            _ => {}
        }
    }
    let path = target.split('?').next().unwrap_or(target);
    Some(Request {
        method: method.to_string(),
        path: path.to_string(),
        close,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        let r = parse("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n").unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.close),
            ("GET", "/metrics", false)
        );
        assert!(parse("GET /metrics HTTP/1.0\r\n").unwrap().close);
        assert!(
            !parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n")
                .unwrap()
                .close
        );
        assert!(
            parse("GET / HTTP/1.1\r\nConnection: close\r\n")
                .unwrap()
                .close
        );
        assert!(
            parse("POST / HTTP/1.1\r\nContent-Length: 5\r\n")
                .unwrap()
                .close
        );
        for bad in [
            "",
            "GET",
            "GET /metrics",
            "GET metrics HTTP/1.1",
            "GET / HTTP/2",
            "GET / HTTP/1.1 x",
            "GET / HTTP/1.1\r\nno-colon",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn heads_end_at_the_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nGET"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
