//! Fast, well-mixed, portable 64-bit hashes for every seeded or content-keyed decision in the data
//! path (shuffles, mixture draws, validation split, shingles). Portable: the same input gives the
//! same hash on every machine and version, which resumable data orders depend on.

/// SplitMix64: a well-mixed 64-bit hash, used for every seeded decision in the data path.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// FNV-1a over the bytes, finished with [`mix`].
pub fn hash_str(s: &str) -> u64 {
    // FNV-1a then SplitMix64: fast and well mixed for short shingles.
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in s.as_bytes() {
        h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    mix(h)
}
