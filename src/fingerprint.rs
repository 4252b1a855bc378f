//! A fast 64-bit fingerprint of weights and token ids: what a run's identity and the reference cache key are
//! made of. Not cryptographic; it tells runs apart, it does not resist an adversary. Four independent lanes of
//! multiply-rotate over 64-bit words, so hashing a model's weights costs well under a second per GB.

const K: [u64; 4] = [0x9E37_79B9_7F4A_7C15, 0xC2B2_AE3D_27D4_EB4F, 0x1656_67B1_9E37_79F9, 0x85EB_CA77_C2B2_AE63];

pub struct Fingerprint {
    lanes: [u64; 4],
    words: u64,
}

impl Default for Fingerprint {
    fn default() -> Self {
        Fingerprint { lanes: K, words: 0 }
    }
}

impl Fingerprint {
    fn mix(lane: u64, word: u64, k: u64) -> u64 {
        (lane ^ word).wrapping_mul(k).rotate_left(31)
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        let l = (self.words % 4) as usize;
        self.lanes[l] = Self::mix(self.lanes[l], v, K[l]);
        self.words += 1;
        self
    }

    /// A length first, so that `[a, b] + [c]` and `[a] + [b, c]` differ.
    pub fn u32s(&mut self, v: &[u32]) -> &mut Self {
        self.u64(v.len() as u64);
        for pair in v.chunks(2) {
            self.u64(pair[0] as u64 | (pair.get(1).copied().unwrap_or(0) as u64) << 32);
        }
        self
    }

    pub fn f32s(&mut self, v: &[f32]) -> &mut Self {
        self.u64(v.len() as u64);
        self.f32_values(v)
    }

    /// `f32s` without the length: the values of a long run fed in parts, each part but the last a multiple of
    /// 8 values long, give the fingerprint of the whole.
    pub fn f32_values(&mut self, v: &[f32]) -> &mut Self {
        let mut quads = v.chunks_exact(8);
        for q in &mut quads {
            let w = |i: usize| q[i].to_bits() as u64 | (q[i + 1].to_bits() as u64) << 32;
            for (l, i) in [0usize, 2, 4, 6].into_iter().enumerate() {
                self.lanes[l] = Self::mix(self.lanes[l], w(i), K[l]);
            }
        }
        for pair in quads.remainder().chunks(2) {
            self.u64(pair[0].to_bits() as u64 | (pair.get(1).map_or(0, |x| x.to_bits()) as u64) << 32);
        }
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64);
        for chunk in v.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.u64(u64::from_le_bytes(w));
        }
        self
    }

    pub fn finish(&self) -> u64 {
        let mut h = self.words.wrapping_mul(K[0]);
        for (l, lane) in self.lanes.iter().enumerate() {
            h = Self::mix(h, *lane, K[(l + 1) % 4]);
        }
        h ^ (h >> 29)
    }

    /// `finish` as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::Fingerprint;

    #[test]
    fn one_changed_value_or_a_moved_boundary_changes_the_fingerprint() {
        let v: Vec<f32> = (0..1001).map(|i| i as f32 * 0.5).collect();
        let base = Fingerprint::default().f32s(&v).finish();
        for i in [0, 7, 8, 500, 1000] {
            let mut w = v.clone();
            w[i] = f32::from_bits(w[i].to_bits() ^ 1);
            assert_ne!(Fingerprint::default().f32s(&w).finish(), base, "bit flip at {i}");
        }
        assert_eq!(Fingerprint::default().f32s(&v).finish(), base);
        let split = Fingerprint::default().u32s(&[1, 2]).u32s(&[3]).finish();
        assert_ne!(split, Fingerprint::default().u32s(&[1]).u32s(&[2, 3]).finish());
    }
}
