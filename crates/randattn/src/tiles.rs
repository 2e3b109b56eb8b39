//! Tile sizes shared by every kernel that streams over queries and keys (the exact kernel and
//! the methods that run parts of it or tile their own products the same way).

/// Query rows per block (forward task granularity, and the backward's inner tile).
pub const QUERY_BLOCK: usize = 128;
/// Keys per tile in the forward pass.
pub const KEY_TILE: usize = 512;
/// Keys per tile in the backward pass (smaller: four tiles of scratch are live at once).
pub const BACKWARD_KEY_TILE: usize = 128;
/// Query rows per inner tile of the backward pass.
pub const BACKWARD_QUERY_BLOCK: usize = 128;
