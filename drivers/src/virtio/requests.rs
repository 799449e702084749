//! Open requests and their parts: a request split at the device's limits
//! completes once, when its last part does, with the first error any part
//! had. Shared by both drivers; pure and host-tested.

use super::{Error, RequestId};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// A request whose parts are not all done.
#[derive(Debug)]
pub struct Open {
    /// Parts submitted and not yet finished.
    pub remaining: usize,
    /// The first error a part reported.
    pub error: Option<Error>,
    /// The caller's buffer; parts point into it, so it is never resized
    /// while the request is open.
    pub buf: Vec<u8>,
    /// Send a flush once every part succeeded (a FUA write on a device
    /// without a FUA bit).
    pub flush_after: bool,
}

impl Open {
    /// The request's outcome.
    pub fn result(&self) -> Result<(), Error> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

/// Every open request of one device.
#[derive(Debug, Default)]
pub struct Requests {
    next: RequestId,
    open: BTreeMap<RequestId, Open>,
}

impl Requests {
    /// A new request with `parts` parts.
    pub fn open(&mut self, parts: usize, buf: Vec<u8>, flush_after: bool) -> RequestId {
        let id = self.next;
        self.next += 1;
        self.open.insert(
            id,
            Open {
                remaining: parts,
                error: None,
                buf,
                flush_after,
            },
        );
        id
    }

    /// Puts back a request that needs more parts (its follow-up flush).
    pub fn reopen(&mut self, id: RequestId, mut open: Open, parts: usize) {
        open.remaining = parts;
        self.open.insert(id, open);
    }

    /// The buffer of open request `id`.
    pub fn buf(&mut self, id: RequestId) -> Option<&mut [u8]> {
        self.open.get_mut(&id).map(|o| o.buf.as_mut_slice())
    }

    /// Records one part's result; returns the request once its last part
    /// has finished.
    pub fn finish_part(&mut self, id: RequestId, result: Result<(), Error>) -> Option<Open> {
        let open = self.open.get_mut(&id)?;
        if let Err(e) = result {
            open.error.get_or_insert(e);
        }
        open.remaining = open.remaining.saturating_sub(1);
        if open.remaining == 0 {
            self.open.remove(&id)
        } else {
            None
        }
    }

    /// Requests still open.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn completes_once_after_the_last_part_with_the_first_error() {
        let mut r = Requests::default();
        let a = r.open(3, vec![1, 2, 3], false);
        let b = r.open(1, vec![], false);
        assert_ne!(a, b);
        assert!(r.finish_part(a, Ok(())).is_none());
        assert!(r.finish_part(a, Err(Error::Io)).is_none());
        let done = r.finish_part(a, Err(Error::Unsupported)).unwrap();
        assert_eq!(done.result(), Err(Error::Io));
        assert_eq!(done.buf, vec![1, 2, 3]);
        assert!(r.finish_part(a, Ok(())).is_none(), "closed");
        assert_eq!(r.finish_part(b, Ok(())).unwrap().result(), Ok(()));
        assert!(r.is_empty());
    }

    #[test]
    fn reopen_adds_a_follow_up_part() {
        let mut r = Requests::default();
        let a = r.open(1, vec![], true);
        let done = r.finish_part(a, Ok(())).unwrap();
        assert!(done.flush_after);
        r.reopen(
            a,
            Open {
                flush_after: false,
                ..done
            },
            1,
        );
        assert_eq!(r.len(), 1);
        assert!(r.finish_part(a, Ok(())).is_some());
    }
}
