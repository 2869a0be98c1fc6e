//! Seeded randomness for the fuzz and model tests: a failing run prints the seed that
//! repeats it.

/// xorshift64*, seeded per test.
pub struct Rng(u64);

impl Rng {
    /// Seeded from the environment variable `seed_var` when set, at random otherwise;
    /// the seed is printed, so a failing run can be repeated.
    pub fn seeded(test: &str, seed_var: &str) -> Rng {
        let seed = std::env::var(seed_var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let mut b = [0u8; 8];
                getrandom::fill(&mut b).expect("random bytes");
                u64::from_le_bytes(b)
            });
        println!("{test}: {seed_var}={seed}");
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    /// Bytes biased towards what decoders trip on: short, JSON-ish, record-like.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max as u64 + 1) as usize;
        const ALPHABET: &[u8] = b"{}[]\":,0123456789-.eE \\nulltruefalse\xE1\x00\xff";
        (0..len)
            .map(|_| {
                if self.chance(2) {
                    ALPHABET[self.below(ALPHABET.len() as u64) as usize]
                } else {
                    self.next_u64() as u8
                }
            })
            .collect()
    }
    /// An integer biased towards edges.
    pub fn int(&mut self) -> i64 {
        match self.below(8) {
            0 => 0,
            1 => -1,
            2 => i64::MAX,
            3 => i64::MIN,
            4 => i64::from(i32::MAX),
            5 => self.below(10) as i64,
            _ => self.next_u64() as i64,
        }
    }
}

/// `n` times the factor in the environment variable `scale_var` (1 when unset): more cases
/// for a longer run.
pub fn scaled(n: usize, scale_var: &str) -> usize {
    let scale: usize = std::env::var(scale_var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    n * scale.max(1)
}
