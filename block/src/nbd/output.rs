//! The bytes a connection owes its client, queued without copying payloads.
//!
//! Replies are headers the engine writes (small, coalesced into reusable
//! buffers), read data the host handed over (moved in, never copied), and
//! runs of zeroes (a hole in a simple reply or under `NBD_CMD_FLAG_DF`,
//! served from one static page). The host drains the queue with
//! [`Output::chunk`] and [`Output::consume`], as much as its socket takes.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

/// A page of zeroes that every `Zeroes` segment is served from.
static ZERO_PAGE: [u8; 4096] = [0; 4096];

/// How many spent header buffers are kept for reuse.
const SPARE_BUFFERS: usize = 4;

/// Header buffers larger than this are not recycled.
const MAX_RECYCLED_CAPACITY: usize = 64 * 1024;

#[derive(Debug)]
enum Segment {
    /// Engine-written bytes; later headers are appended to it.
    Head(Vec<u8>),
    /// A host's buffer, sent as is.
    Payload(Vec<u8>),
    /// This many zero bytes.
    Zeroes(u64),
}

impl Segment {
    fn len(&self) -> u64 {
        match self {
            Segment::Head(v) | Segment::Payload(v) => v.len() as u64,
            Segment::Zeroes(n) => *n,
        }
    }
}

/// The outgoing byte queue of one connection.
#[derive(Debug, Default)]
pub struct Output {
    segments: VecDeque<Segment>,
    /// Bytes of the front segment already sent.
    sent: u64,
    /// Bytes queued and not yet sent.
    len: u64,
    spare: Vec<Vec<u8>>,
}

impl Output {
    /// An empty queue.
    pub fn new() -> Output {
        Output::default()
    }

    /// Bytes waiting to be sent.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether everything has been sent.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append engine-written bytes: `f` writes them at the end of a
    /// header buffer.
    pub fn write(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        if !matches!(self.segments.back(), Some(Segment::Head(_))) {
            let buf = self.spare.pop().unwrap_or_default();
            self.segments.push_back(Segment::Head(buf));
        }
        if let Some(Segment::Head(buf)) = self.segments.back_mut() {
            let before = buf.len();
            f(buf);
            self.len += (buf.len() - before) as u64;
        }
    }

    /// Append a host's buffer.
    pub fn payload(&mut self, data: Vec<u8>) {
        if !data.is_empty() {
            self.len += data.len() as u64;
            self.segments.push_back(Segment::Payload(data));
        }
    }

    /// Append `n` zero bytes.
    pub fn zeroes(&mut self, n: u64) {
        if n > 0 {
            self.len += n;
            self.segments.push_back(Segment::Zeroes(n));
        }
    }

    /// The next bytes to send (empty when nothing is queued).
    pub fn chunk(&self) -> &[u8] {
        let sent = self.sent as usize;
        match self.segments.front() {
            None => &[],
            Some(Segment::Head(v)) | Some(Segment::Payload(v)) => &v[sent..],
            Some(Segment::Zeroes(n)) => {
                let left = (*n - self.sent).min(ZERO_PAGE.len() as u64) as usize;
                &ZERO_PAGE[..left]
            }
        }
    }

    /// Every queued byte range in order, for vectored writes.
    pub fn chunks(&self) -> Chunks<'_> {
        let (first, zeroes) = match self.segments.front() {
            Some(Segment::Zeroes(n)) => (None, *n - self.sent),
            _ => {
                let first = self.chunk();
                ((!first.is_empty()).then_some(first), 0)
            }
        };
        Chunks {
            first,
            rest: self.segments.iter().skip(1),
            zeroes,
        }
    }

    /// Mark `n` bytes (at most [`Output::len`]) as sent.
    pub fn consume(&mut self, mut n: u64) {
        n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let Some(front) = self.segments.front() else {
                break;
            };
            let left = front.len() - self.sent;
            if n < left {
                self.sent += n;
                return;
            }
            n -= left;
            self.sent = 0;
            if let Some(Segment::Head(mut buf)) = self.segments.pop_front()
                && self.spare.len() < SPARE_BUFFERS
                && buf.capacity() <= MAX_RECYCLED_CAPACITY
            {
                buf.clear();
                self.spare.push(buf);
            }
        }
        // A fully sent head segment stays at the back to take the next
        // header; drop it if the queue is otherwise empty and spent.
        if self.len == 0
            && let Some(Segment::Head(buf)) = self.segments.front()
            && buf.len() as u64 == self.sent
        {
            if let Some(Segment::Head(mut buf)) = self.segments.pop_front() {
                buf.clear();
                if self.spare.len() < SPARE_BUFFERS {
                    self.spare.push(buf);
                }
            }
            self.sent = 0;
        }
    }

    /// Drop everything queued.
    pub fn clear(&mut self) {
        self.segments.clear();
        self.sent = 0;
        self.len = 0;
    }
}

/// The iterator of [`Output::chunks`].
pub struct Chunks<'a> {
    first: Option<&'a [u8]>,
    rest: core::iter::Skip<alloc::collections::vec_deque::Iter<'a, Segment>>,
    /// Zero bytes of the current `Zeroes` segment still to yield.
    zeroes: u64,
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        loop {
            if self.zeroes > 0 {
                let n = self.zeroes.min(ZERO_PAGE.len() as u64);
                self.zeroes -= n;
                return Some(&ZERO_PAGE[..n as usize]);
            }
            match self.rest.next()? {
                Segment::Head(v) | Segment::Payload(v) => {
                    if !v.is_empty() {
                        return Some(v);
                    }
                }
                Segment::Zeroes(n) => self.zeroes = *n,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn all(o: &Output) -> Vec<u8> {
        o.chunks().flatten().copied().collect()
    }

    #[test]
    fn chunks_and_consume_agree_across_segment_kinds() {
        let mut o = Output::new();
        o.write(|b| b.extend_from_slice(b"head"));
        o.zeroes(10_000);
        o.payload(vec![7; 5000]);
        o.write(|b| b.extend_from_slice(b"tail"));
        o.write(|b| b.extend_from_slice(b"+more"));
        let mut want = b"head".to_vec();
        want.extend(vec![0; 10_000]);
        want.extend(vec![7; 5000]);
        want.extend_from_slice(b"tail+more");
        assert_eq!(o.len(), want.len() as u64);
        assert_eq!(all(&o), want);
        // Drain in odd steps, from the middle of the zero run too.
        let mut sent = Vec::new();
        for step in [3usize, 1, 4097, 8000, 1, 2999, 100_000] {
            assert_eq!(all(&o), want[sent.len()..]);
            let c = o.chunk();
            let n = step.min(c.len()).max(usize::from(!c.is_empty()));
            sent.extend_from_slice(&c[..n]);
            o.consume(n as u64);
            let rest: Vec<u8> = o.chunks().flatten().copied().collect();
            assert_eq!(rest.len() as u64, o.len());
        }
        while !o.is_empty() {
            let c = o.chunk().to_vec();
            sent.extend_from_slice(&c);
            o.consume(c.len() as u64);
        }
        assert_eq!(sent, want);
        assert!(o.chunks().next().is_none());
    }

    #[test]
    fn header_buffers_are_reused() {
        let mut o = Output::new();
        for _ in 0..100 {
            o.write(|b| b.extend_from_slice(&[1; 16]));
            o.consume(16);
        }
        assert!(o.is_empty());
        assert!(o.spare.len() <= SPARE_BUFFERS);
    }
}
