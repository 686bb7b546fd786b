//! SPDY/3.1, the server side, as far as Kubernetes' streaming uses it: kubectl ≤ 1.29 and
//! client-go's fallback for `exec`/`attach`, and every kubectl's `port-forward` (since 1.31
//! tunneled through a WebSocket), all speaking it with moby's `spdystream`.
//!
//! The client opens every stream (`SYN_STREAM`, its kind in a `streamtype` header); the
//! server accepts each with a `SYN_REPLY` and both sides send data frames until each ends
//! its half with `FIN`. Header blocks are zlib-compressed, one compression context per
//! direction for the whole connection, primed with SPDY/3's dictionary. `spdystream` does
//! no flow control (it neither sends nor honours `WINDOW_UPDATE`), so neither does this.
//!
//! [`Connection::serve`] runs a connection over any byte stream: a reader task decodes
//! frames and hands new streams to the consumer, a writer task encodes what the streams
//! send, in order.

use std::collections::HashMap;
use std::io;
use std::sync::LazyLock;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const FLAG_FIN: u8 = 0x01;
/// `RST_STREAM` status: the stream was refused (or is no longer wanted).
pub const REFUSED_STREAM: u32 = 3;
/// `RST_STREAM` status: the stream ended in error.
pub const INTERNAL_ERROR: u32 = 6;
/// The largest data frame sent; larger writes are split.
const MAX_DATA: usize = 32 * 1024;
/// The largest decompressed header block accepted.
const MAX_HEADER_BLOCK: usize = 1 << 20;

/// SPDY/3's header compression dictionary (draft-mbelshe-httpbis-spdy-00 §2.6.10.1): the
/// header names and values of the time, each with a 4-byte length, then a run of common
/// text. Peers' zlib streams name it by checksum; it must be byte-exact.
pub static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TEXT: &str = "100101201202205206300302303304305306307402405406407408409410411412413\
        414415416417502504505203 Non-Authoritative Information204 No Content301 Moved \
        Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal \
        Server Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul \
        Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,\
        text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,\
        text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8\
        charset=iso-8859-1,utf-,*,enq=0.";
    let mut dictionary = Vec::with_capacity(1423);
    for word in WORDS {
        dictionary.extend_from_slice(&(word.len() as u32).to_be_bytes());
        dictionary.extend_from_slice(word.as_bytes());
    }
    dictionary.extend_from_slice(TEXT.as_bytes());
    dictionary
});

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    /// The byte stream failed.
    #[error("reading the connection: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol.
    #[error("SPDY protocol error: {0}")]
    Protocol(String),
}

/// A stream's headers: names lower-case, a multi-valued header once per value.
pub type Headers = Vec<(String, String)>;

/// The zlib contexts of one connection's header blocks, one per direction.
struct HeaderCodec {
    inflate: Decompress,
    deflate: Compress,
}

impl HeaderCodec {
    fn new() -> HeaderCodec {
        let mut deflate = Compress::new(Compression::default(), true);
        // A fresh context takes a dictionary before its first byte: cannot fail.
        let _ = deflate.set_dictionary(&DICTIONARY);
        HeaderCodec {
            inflate: Decompress::new(true),
            deflate,
        }
    }

    /// Decompresses one header block (the connection's context continues across blocks).
    fn decode(&mut self, block: &[u8]) -> Result<Headers, SpdyError> {
        let bad = |e: &dyn std::fmt::Display| SpdyError::Protocol(format!("header block: {e}"));
        let mut out = Vec::with_capacity(block.len() * 4 + 256);
        let start = self.inflate.total_in();
        loop {
            let consumed = (self.inflate.total_in() - start) as usize;
            let before = (self.inflate.total_in(), self.inflate.total_out());
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(SpdyError::Protocol("header block too large".into()));
                }
                out.reserve(out.capacity());
            }
            match self
                .inflate
                .decompress_vec(&block[consumed..], &mut out, FlushDecompress::Sync)
            {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(&DICTIONARY)
                        .map_err(|e| bad(&e))?;
                    continue;
                }
                Err(e) => return Err(bad(&e)),
            }
            let done = (self.inflate.total_in() - start) as usize == block.len();
            if done && out.len() < out.capacity() {
                break;
            }
            if before == (self.inflate.total_in(), self.inflate.total_out())
                && out.len() < out.capacity()
            {
                return Err(bad(&"truncated"));
            }
        }
        parse_headers(&out)
    }

    /// Compresses one header block.
    fn encode(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut block = Vec::new();
        block.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            for part in [name.to_ascii_lowercase().as_str(), value] {
                block.extend_from_slice(&(part.len() as u32).to_be_bytes());
                block.extend_from_slice(part.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(block.len() + 64);
        let start = self.deflate.total_in();
        loop {
            let consumed = (self.deflate.total_in() - start) as usize;
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(64));
            }
            // Compressing into memory fails only on a misuse of the stream.
            if self
                .deflate
                .compress_vec(&block[consumed..], &mut out, FlushCompress::Sync)
                .is_err()
            {
                break;
            }
            let done = (self.deflate.total_in() - start) as usize == block.len();
            if done && out.len() < out.capacity() {
                break;
            }
        }
        out
    }
}

/// Parses a decompressed header block: a count, then length-prefixed names and values
/// (values NUL-separated when a header has several).
fn parse_headers(block: &[u8]) -> Result<Headers, SpdyError> {
    let bad = || SpdyError::Protocol("malformed header block".into());
    let mut rest = block;
    let mut take = |n: usize| -> Result<&[u8], SpdyError> {
        if rest.len() < n {
            return Err(bad());
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let count = be32(take(4)?);
    let mut headers = Vec::new();
    for _ in 0..count {
        let len = be32(take(4)?);
        let name = String::from_utf8_lossy(take(len)?).to_ascii_lowercase();
        let len = be32(take(4)?);
        let value = String::from_utf8_lossy(take(len)?).into_owned();
        for v in value.split('\0') {
            headers.push((name.clone(), v.to_owned()));
        }
    }
    Ok(headers)
}

/// A frame read from the peer.
#[derive(Debug)]
enum Frame {
    SynStream {
        stream: u32,
        fin: bool,
        block: Vec<u8>,
    },
    RstStream {
        stream: u32,
    },
    Ping(u32),
    GoAway,
    Data {
        stream: u32,
        fin: bool,
        data: Bytes,
    },
    /// `HEADERS` (its block still decompressed, to keep the context in step), `SETTINGS`,
    /// `WINDOW_UPDATE` and anything newer: nothing to do.
    Other {
        block: Option<Vec<u8>>,
    },
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> Result<Option<Frame>, SpdyError> {
    let mut head = [0u8; 8];
    match io.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let flags = head[4];
    let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await?;
    if head[0] & 0x80 == 0 {
        return Ok(Some(Frame::Data {
            stream: be32(&head[..4]) & 0x7fff_ffff,
            fin: flags & FLAG_FIN != 0,
            data: Bytes::from(payload),
        }));
    }
    let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
    if version != VERSION {
        return Err(SpdyError::Protocol(format!(
            "unsupported version {version}"
        )));
    }
    let kind = u16::from_be_bytes([head[2], head[3]]);
    let short = || SpdyError::Protocol(format!("frame of type {kind} too short"));
    let frame = match kind {
        SYN_STREAM => {
            // Stream ID, associated stream ID, priority and slot, then the header block.
            if payload.len() < 10 {
                return Err(short());
            }
            Frame::SynStream {
                stream: be32(&payload[..4]) & 0x7fff_ffff,
                fin: flags & FLAG_FIN != 0,
                block: payload[10..].to_vec(),
            }
        }
        SYN_REPLY | HEADERS => {
            if payload.len() < 4 {
                return Err(short());
            }
            Frame::Other {
                block: Some(payload[4..].to_vec()),
            }
        }
        RST_STREAM => {
            if payload.len() < 8 {
                return Err(short());
            }
            Frame::RstStream {
                stream: be32(&payload[..4]) & 0x7fff_ffff,
            }
        }
        PING => {
            if payload.len() < 4 {
                return Err(short());
            }
            Frame::Ping(be32(&payload[..4]))
        }
        GOAWAY => Frame::GoAway,
        _ => Frame::Other { block: None },
    };
    Ok(Some(frame))
}

fn control(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    frame.extend_from_slice(&kind.to_be_bytes());
    frame.push(flags);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(payload);
    frame
}

fn data_frame(stream: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + data.len());
    frame.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    frame.push(if fin { FLAG_FIN } else { 0 });
    frame.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(data);
    frame
}

/// What the writer task is asked to send.
enum Out {
    Reply(u32),
    Data(u32, Bytes, bool),
    Reset(u32, u32),
    Ping(u32),
    /// `GOAWAY`, then the connection is closed.
    GoAway,
}

/// One stream the client opened.
#[derive(Debug)]
pub struct SpdyStream {
    /// Its ID.
    pub id: u32,
    /// Its `SYN_STREAM` headers.
    pub headers: Headers,
    /// What the client sends on it, until it ends its half (the channel closes).
    pub incoming: mpsc::Receiver<Bytes>,
    /// The server's half.
    pub out: StreamOut,
}

impl SpdyStream {
    /// The value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The server's half of a stream.
#[derive(Clone, Debug)]
pub struct StreamOut {
    id: u32,
    tx: mpsc::Sender<Out>,
}

/// The connection is gone: nothing more can be sent.
#[derive(Debug, thiserror::Error)]
#[error("the SPDY connection is closed")]
pub struct Closed;

impl StreamOut {
    /// Sends `data` (in frames of at most 32 KiB).
    pub async fn send(&self, data: &[u8]) -> Result<(), Closed> {
        for chunk in data.chunks(MAX_DATA) {
            self.tx
                .send(Out::Data(self.id, Bytes::copy_from_slice(chunk), false))
                .await
                .map_err(|_| Closed)?;
        }
        Ok(())
    }

    /// Ends the server's half (`FIN`).
    pub async fn finish(&self) {
        let _ = self.tx.send(Out::Data(self.id, Bytes::new(), true)).await;
    }

    /// Aborts the stream (`RST_STREAM`).
    pub async fn reset(&self, status: u32) {
        let _ = self.tx.send(Out::Reset(self.id, status)).await;
    }
}

/// A served connection: the streams the client opens arrive on [`Connection::streams`],
/// which ends when the client goes away.
#[derive(Debug)]
pub struct Connection {
    /// Streams as the client opens them, each already accepted.
    pub streams: mpsc::Receiver<SpdyStream>,
    tx: mpsc::Sender<Out>,
    stop_reader: Option<oneshot::Sender<()>>,
}

impl Connection {
    /// Serves SPDY on `io` (after the HTTP upgrade).
    pub fn serve<IO>(io: IO) -> Connection
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(io);
        let (tx, rx) = mpsc::channel::<Out>(64);
        let (accept_tx, streams) = mpsc::channel(16);
        let (stop_reader, stopped) = oneshot::channel();
        let codec = std::sync::Arc::new(std::sync::Mutex::new(HeaderCodec::new()));
        tokio::spawn(write_loop(writer, rx, codec.clone()));
        let reader_tx = tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = read_loop(reader, reader_tx, accept_tx, codec) => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "SPDY connection ended");
                    }
                }
                _ = stopped => {}
            }
        });
        Connection {
            streams,
            tx,
            stop_reader: Some(stop_reader),
        }
    }

    /// Waits until the client goes away; streams it opens meanwhile are refused.
    pub async fn closed(&mut self) {
        while let Some(stream) = self.streams.recv().await {
            stream.out.reset(REFUSED_STREAM).await;
        }
    }

    /// Says `GOAWAY` once everything queued is sent, and closes the connection.
    pub async fn close(mut self) {
        let _ = self.tx.send(Out::GoAway).await;
        if let Some(stop) = self.stop_reader.take() {
            let _ = stop.send(());
        }
    }
}

async fn read_loop(
    mut io: impl AsyncRead + Unpin,
    tx: mpsc::Sender<Out>,
    accept: mpsc::Sender<SpdyStream>,
    codec: std::sync::Arc<std::sync::Mutex<HeaderCodec>>,
) -> Result<(), SpdyError> {
    let mut open: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    while let Some(frame) = read_frame(&mut io).await? {
        match frame {
            Frame::SynStream { stream, fin, block } => {
                let headers = lock(&codec).decode(&block)?;
                if stream % 2 == 0 || open.contains_key(&stream) {
                    let _ = tx.send(Out::Reset(stream, 1)).await;
                    continue;
                }
                let (data_tx, incoming) = mpsc::channel(16);
                if !fin {
                    open.insert(stream, data_tx);
                }
                // Accepted before the consumer can write on it: the reply goes first.
                if tx.send(Out::Reply(stream)).await.is_err() {
                    break;
                }
                let out = StreamOut {
                    id: stream,
                    tx: tx.clone(),
                };
                let accepted = SpdyStream {
                    id: stream,
                    headers,
                    incoming,
                    out,
                };
                if let Err(refused) = accept.send(accepted).await {
                    refused.0.out.reset(REFUSED_STREAM).await;
                }
            }
            Frame::Data { stream, fin, data } => {
                if let Some(sink) = open.get(&stream)
                    && !data.is_empty()
                    && sink.send(data).await.is_err()
                {
                    // The consumer stopped reading: what follows is dropped.
                    open.remove(&stream);
                }
                if fin {
                    open.remove(&stream);
                }
            }
            Frame::RstStream { stream } => {
                open.remove(&stream);
            }
            Frame::Ping(id) => {
                let _ = tx.send(Out::Ping(id)).await;
            }
            Frame::GoAway => break,
            Frame::Other { block } => {
                if let Some(block) = block {
                    lock(&codec).decode(&block)?;
                }
            }
        }
    }
    Ok(())
}

fn lock(codec: &std::sync::Mutex<HeaderCodec>) -> std::sync::MutexGuard<'_, HeaderCodec> {
    codec
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn write_loop(
    mut io: impl AsyncWrite + Unpin,
    mut rx: mpsc::Receiver<Out>,
    codec: std::sync::Arc<std::sync::Mutex<HeaderCodec>>,
) {
    let mut reset = std::collections::HashSet::new();
    while let Some(out) = rx.recv().await {
        let frame = match out {
            Out::Reply(stream) => {
                let block = lock(&codec).encode(&[]);
                let mut payload = stream.to_be_bytes().to_vec();
                payload.extend(block);
                control(SYN_REPLY, 0, &payload)
            }
            Out::Data(stream, data, fin) => {
                if reset.contains(&stream) {
                    continue;
                }
                data_frame(stream, fin, &data)
            }
            Out::Reset(stream, status) => {
                reset.insert(stream);
                let mut payload = stream.to_be_bytes().to_vec();
                payload.extend(status.to_be_bytes());
                control(RST_STREAM, 0, &payload)
            }
            Out::Ping(id) => control(PING, 0, &id.to_be_bytes()),
            Out::GoAway => {
                let mut payload = 0u32.to_be_bytes().to_vec();
                payload.extend(0u32.to_be_bytes());
                let _ = io.write_all(&control(GOAWAY, 0, &payload)).await;
                let _ = io.flush().await;
                let _ = io.shutdown().await;
                return;
            }
        };
        if io.write_all(&frame).await.is_err() {
            return;
        }
        if rx.is_empty() && io.flush().await.is_err() {
            return;
        }
    }
    let _ = io.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        // Its length and Adler-32, as every SPDY/3 implementation has them.
        assert_eq!(DICTIONARY.len(), 1423);
        let mut deflate = Compress::new(Compression::default(), true);
        let adler = deflate.set_dictionary(&DICTIONARY).unwrap();
        assert_eq!(adler, 0xe3c6_a7c2, "{adler:#x}");
    }

    #[test]
    fn header_blocks_round_trip_across_one_context() {
        let mut server = HeaderCodec::new();
        let mut client = HeaderCodec::new();
        for i in 0..3 {
            let port = i.to_string();
            let block = client.encode(&[("streamType", "data"), ("port", &port)]);
            let headers = server.decode(&block).unwrap();
            assert_eq!(
                headers,
                vec![
                    ("streamtype".to_owned(), "data".to_owned()),
                    ("port".to_owned(), port.clone())
                ]
            );
        }
        assert!(server.decode(b"\x78\x00garbage").is_err());
    }

    #[tokio::test]
    async fn streams_are_accepted_and_carry_data_both_ways() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut connection = Connection::serve(server);
        let (mut read, mut write) = tokio::io::split(client);
        let mut codec = HeaderCodec::new();

        // SYN_STREAM 1 with `streamtype: stdin`, then data and FIN.
        let mut payload = 1u32.to_be_bytes().to_vec();
        payload.extend([0, 0, 0, 0, 0, 0]);
        payload.extend(codec.encode(&[("streamtype", "stdin")]));
        write
            .write_all(&control(SYN_STREAM, 0, &payload))
            .await
            .unwrap();
        write
            .write_all(&data_frame(1, false, b"hello"))
            .await
            .unwrap();
        write.write_all(&data_frame(1, true, b"")).await.unwrap();

        let mut stream = connection.streams.recv().await.unwrap();
        assert_eq!((stream.id, stream.header("streamtype")), (1, Some("stdin")));
        assert_eq!(stream.incoming.recv().await.unwrap(), &b"hello"[..]);
        assert!(stream.incoming.recv().await.is_none(), "FIN ends it");
        stream.out.send(b"back").await.unwrap();
        stream.out.finish().await;

        // The reply comes first (its header block decodes), then the data, then FIN.
        let Some(Frame::Other { block: Some(block) }) = read_frame(&mut read).await.unwrap() else {
            panic!("no SYN_REPLY")
        };
        assert!(codec.decode(&block).unwrap().is_empty());
        let Some(Frame::Data { stream, fin, data }) = read_frame(&mut read).await.unwrap() else {
            panic!("no data")
        };
        assert_eq!((stream, fin, &data[..]), (1, false, &b"back"[..]));
        let Some(Frame::Data { fin: true, .. }) = read_frame(&mut read).await.unwrap() else {
            panic!("no FIN")
        };
        connection.close().await;
        let Some(Frame::GoAway) = read_frame(&mut read).await.unwrap() else {
            panic!("no GOAWAY")
        };
        assert!(read_frame(&mut read).await.unwrap().is_none());
    }
}
