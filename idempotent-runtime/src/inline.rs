//! [`InlineBuf`]: bytes collected on the stack while they fit, on the heap after. The
//! key builder and the output codec collect into it, so small keys and outputs (most
//! of them) are handled without allocating.
//!
//! The memory store keeps its records' bytes in a compact form of its own: a stored
//! record never grows, and an inline buffer plus a `Vec` would triple its size.

/// Up to `N` bytes inline; all of them in `heap` once they outgrow it.
pub(crate) struct InlineBuf<const N: usize> {
    len: usize,
    inline: [u8; N],
    // empty until the bytes outgrow `inline`; then holds all of them
    heap: Vec<u8>,
}

impl<const N: usize> InlineBuf<N> {
    pub(crate) const fn new() -> Self {
        InlineBuf {
            len: 0,
            inline: [0; N],
            heap: Vec::new(),
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        if self.heap.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.heap
        }
    }

    pub(crate) fn into_vec(self) -> Vec<u8> {
        if self.heap.is_empty() {
            self.inline[..self.len].to_vec()
        } else {
            self.heap
        }
    }

    /// Appends `b`.
    pub(crate) fn extend(&mut self, b: &[u8]) {
        if self.heap.is_empty() && self.len + b.len() <= N {
            self.inline[self.len..self.len + b.len()].copy_from_slice(b);
            self.len += b.len();
        } else {
            if self.heap.is_empty() {
                self.heap.reserve(2 * (self.len + b.len()));
                self.heap.extend_from_slice(&self.inline[..self.len]);
            }
            self.heap.extend_from_slice(b);
        }
    }

    /// Inserts `prefix` before the bytes collected so far.
    pub(crate) fn prepend(&mut self, prefix: &[u8]) {
        if self.heap.is_empty() && self.len + prefix.len() <= N {
            self.inline.copy_within(..self.len, prefix.len());
            self.inline[..prefix.len()].copy_from_slice(prefix);
            self.len += prefix.len();
        } else {
            let old = self.as_slice();
            let mut heap = Vec::with_capacity(2 * (prefix.len() + old.len()));
            heap.extend_from_slice(prefix);
            heap.extend_from_slice(old);
            self.heap = heap;
        }
    }
}

impl<const N: usize> std::io::Write for InlineBuf<N> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.extend(b);
        Ok(b.len())
    }

    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.extend(b);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::InlineBuf;

    #[test]
    fn bytes_move_to_the_heap_once_and_keep_their_order() {
        let mut b = InlineBuf::<4>::new();
        b.extend(b"ab");
        b.prepend(b"x");
        assert_eq!(b.as_slice(), b"xab");
        b.extend(b"cd"); // outgrows the inline part
        b.prepend(b"yz");
        b.extend(b"e");
        assert_eq!(b.as_slice(), b"yzxabcde");
        assert_eq!(b.into_vec(), b"yzxabcde");
        let mut small = InlineBuf::<4>::new();
        small.extend(b"abcd");
        assert_eq!(small.into_vec(), b"abcd");
    }
}
