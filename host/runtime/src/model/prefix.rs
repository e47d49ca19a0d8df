//! KV prefixes kept beside a session's live cache: a radix tree over token
//! ids whose edges hold the K and V of their positions, least recently
//! used edges evicted past a memory budget. A session that moves to
//! another prompt (the user switched files) keeps what its cache held
//! here, and a prompt that shares a longer prefix with a kept one than
//! with the live cache gets it back by copying instead of evaluating it
//! again. Prompts that share a start (a repository header, the same file
//! further down) share its nodes.
//!
//! The tree holds bytes of the fused cache layout ([`Layout`]): per layer,
//! K then V, each position's heads contiguous.

/// Where positions sit in a session's KV cache: layer `l`'s K rows start
/// at `k[l]`, its V rows at `v[l]`, `pos_bytes` per position each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub k: Vec<usize>,
    pub v: Vec<usize>,
    pub pos_bytes: usize,
}

impl Layout {
    /// Bytes of `n` positions' K and V over every layer.
    pub fn bytes(&self, n: usize) -> usize {
        2 * self.k.len() * n * self.pos_bytes
    }

    /// The `n` positions from `at` of `cache`, as a node stores them:
    /// per layer, K's rows then V's.
    fn copy_out(&self, cache: &[u8], at: usize, n: usize) -> Vec<u8> {
        let len = n * self.pos_bytes;
        let mut out = Vec::with_capacity(self.bytes(n));
        for (k, v) in self.k.iter().zip(&self.v) {
            for base in [k, v] {
                let start = base + at * self.pos_bytes;
                out.extend_from_slice(&cache[start..start + len]);
            }
        }
        out
    }

    /// Writes the first `take` of a node's `n` positions into `cache` at
    /// position `at`.
    fn copy_in(&self, node: &[u8], n: usize, take: usize, cache: &mut [u8], at: usize) {
        let (len, part) = (take * self.pos_bytes, n * self.pos_bytes);
        let mut src = 0;
        for (k, v) in self.k.iter().zip(&self.v) {
            for base in [k, v] {
                let start = base + at * self.pos_bytes;
                cache[start..start + len].copy_from_slice(&node[src..src + len]);
                src += part;
            }
        }
    }

    /// Splits a node's bytes of `n` positions after the first `m`.
    fn split(&self, bytes: &[u8], n: usize, m: usize) -> (Vec<u8>, Vec<u8>) {
        let (head, tail) = (m * self.pos_bytes, (n - m) * self.pos_bytes);
        let (mut a, mut b) = (
            Vec::with_capacity(self.bytes(m)),
            Vec::with_capacity(self.bytes(n - m)),
        );
        for part in bytes.chunks_exact(n * self.pos_bytes) {
            a.extend_from_slice(&part[..head]);
            b.extend_from_slice(&part[head..head + tail]);
        }
        (a, b)
    }
}

struct Node {
    /// The edge's tokens (empty for the root).
    tokens: Vec<u32>,
    /// Their K and V ([`Layout::copy_out`]'s order).
    kv: Vec<u8>,
    parent: usize,
    children: Vec<usize>,
    last_used: u64,
}

/// What [`PrefixTree::longest`] found: the tokens matched, and the nodes
/// on the way with how many of each one's tokens match.
pub struct Match {
    pub len: usize,
    path: Vec<(usize, usize)>,
}

/// The kept prefixes of one session's model and layout.
pub struct PrefixTree {
    nodes: Vec<Option<Node>>,
    layout: Layout,
    budget: usize,
    bytes: usize,
    clock: u64,
}

impl PrefixTree {
    /// An empty tree for caches laid out as `layout`, holding at most
    /// `budget` bytes of K and V.
    pub fn new(layout: Layout, budget: usize) -> PrefixTree {
        PrefixTree {
            nodes: vec![Some(Node {
                tokens: Vec::new(),
                kv: Vec::new(),
                parent: 0,
                children: Vec::new(),
                last_used: 0,
            })],
            layout,
            budget,
            bytes: 0,
            clock: 0,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The cache's layers moved (it grew): where K and V start now.
    pub fn set_offsets(&mut self, k: Vec<usize>, v: Vec<usize>) {
        self.layout.k = k;
        self.layout.v = v;
    }

    /// Bytes of K and V kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Token sequences kept (leaves).
    pub fn prefixes(&self) -> usize {
        self.nodes
            .iter()
            .flatten()
            .filter(|n| n.children.is_empty() && !n.tokens.is_empty())
            .count()
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("a live node")
    }

    fn node_mut(&mut self, i: usize) -> &mut Node {
        self.nodes[i].as_mut().expect("a live node")
    }

    /// The longest kept prefix of `tokens`.
    pub fn longest(&self, tokens: &[u32]) -> Match {
        let (mut at, mut len, mut path) = (0, 0, Vec::new());
        'walk: while len < tokens.len() {
            for &c in &self.node(at).children {
                let edge = &self.node(c).tokens;
                let same = edge
                    .iter()
                    .zip(&tokens[len..])
                    .take_while(|(a, b)| a == b)
                    .count();
                if same == 0 {
                    continue;
                }
                path.push((c, same));
                len += same;
                if same < edge.len() {
                    break 'walk;
                }
                at = c;
                continue 'walk;
            }
            break;
        }
        Match { len, path }
    }

    /// Copies the matched prefix's K and V into `cache` (positions
    /// `0..m.len`), and marks its nodes used.
    pub fn restore(&mut self, m: &Match, cache: &mut [u8]) {
        self.clock += 1;
        let mut at = 0;
        for &(node, take) in &m.path {
            let n = self.node(node).tokens.len();
            self.layout.copy_in(&self.node(node).kv, n, take, cache, at);
            at += take;
        }
        let clock = self.clock;
        for &(node, _) in &m.path {
            self.node_mut(node).last_used = clock;
        }
    }

    /// Keeps `tokens`, whose K and V are positions `0..tokens.len()` of
    /// `cache`: only what the tree does not hold yet is copied. Then
    /// evicts least recently used leaves past the budget (never the one
    /// just kept). A prefix larger than the whole budget is not kept.
    pub fn insert(&mut self, tokens: &[u32], cache: &[u8]) {
        if tokens.is_empty() || self.layout.bytes(tokens.len()) > self.budget {
            return;
        }
        self.clock += 1;
        let clock = self.clock;
        let m = self.longest(tokens);
        let mut parent = 0;
        for &(node, take) in &m.path {
            if take < self.node(node).tokens.len() {
                self.split(node, take);
            }
            self.node_mut(node).last_used = clock;
            parent = node;
        }
        let mut leaf = parent;
        if m.len < tokens.len() {
            let n = tokens.len() - m.len;
            let kv = self.layout.copy_out(cache, m.len, n);
            self.bytes += kv.len();
            leaf = self.add(Node {
                tokens: tokens[m.len..].to_vec(),
                kv,
                parent,
                children: Vec::new(),
                last_used: clock,
            });
            self.node_mut(parent).children.push(leaf);
        }
        self.evict(leaf);
    }

    fn add(&mut self, node: Node) -> usize {
        match self.nodes.iter().position(Option::is_none) {
            Some(i) => {
                self.nodes[i] = Some(node);
                i
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        }
    }

    /// Cuts node `i`'s edge after `m` tokens: `i` keeps the head, a new
    /// child the tail (with `i`'s children).
    fn split(&mut self, i: usize, m: usize) {
        let node = self.node_mut(i);
        let n = node.tokens.len();
        let tail_tokens = node.tokens.split_off(m);
        let kv = std::mem::take(&mut node.kv);
        let children = std::mem::take(&mut node.children);
        let last_used = node.last_used;
        let (head, tail) = self.layout.split(&kv, n, m);
        self.node_mut(i).kv = head;
        let t = self.add(Node {
            tokens: tail_tokens,
            kv: tail,
            parent: i,
            children,
            last_used,
        });
        for c in self.node(t).children.clone() {
            self.node_mut(c).parent = t;
        }
        self.node_mut(i).children.push(t);
    }

    /// Drops least recently used leaves (other than `keep` and its
    /// ancestors) until the tree fits its budget.
    fn evict(&mut self, keep: usize) {
        let mut kept = vec![keep];
        let mut at = keep;
        while at != 0 {
            at = self.node(at).parent;
            kept.push(at);
        }
        while self.bytes > self.budget {
            let victim = self
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
                .filter(|(i, n)| *i != 0 && n.children.is_empty() && !kept.contains(i))
                .min_by_key(|(_, n)| n.last_used)
                .map(|(i, _)| i);
            let Some(v) = victim else { break };
            let node = self.nodes[v].take().expect("a live node");
            self.bytes -= node.kv.len();
            self.node_mut(node.parent).children.retain(|&c| c != v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache of `n` positions, 2 layers, 3 bytes a position, where
    /// every byte names its layer, K or V, and the token at its position.
    fn cache(tokens: &[u32], n: usize) -> (Layout, Vec<u8>) {
        let pos = 3;
        let layer = n * pos;
        let layout = Layout {
            k: vec![0, 2 * layer],
            v: vec![layer, 3 * layer],
            pos_bytes: pos,
        };
        let mut c = vec![0u8; 4 * layer];
        for (l, (k, v)) in layout.k.iter().zip(&layout.v).enumerate() {
            for (which, base) in [k, v].into_iter().enumerate() {
                for (p, t) in tokens.iter().enumerate() {
                    for b in 0..pos {
                        c[base + p * pos + b] = (*t as u8) ^ ((l * 2 + which) as u8) << 5;
                    }
                }
            }
        }
        (layout, c)
    }

    #[test]
    fn a_kept_prefix_comes_back_byte_for_byte_and_shares_its_start() {
        let a: Vec<u32> = (1..=12).collect();
        let b: Vec<u32> = (1..=5).chain(20..30).collect();
        let (layout, ca) = cache(&a, 32);
        let (_, cb) = cache(&b, 32);
        let mut tree = PrefixTree::new(layout.clone(), 1 << 20);
        tree.insert(&a, &ca);
        tree.insert(&b, &cb);
        // The shared start is stored once: 12 + 10 positions.
        assert_eq!(tree.bytes(), layout.bytes(22));
        assert_eq!(tree.prefixes(), 2);
        for (seq, want) in [(&a, &ca), (&b, &cb)] {
            let mut query = seq.clone();
            query.push(99);
            let m = tree.longest(&query);
            assert_eq!(m.len, seq.len());
            let mut out = vec![0u8; want.len()];
            tree.restore(&m, &mut out);
            for base in layout.k.iter().chain(&layout.v) {
                let r = *base..base + seq.len() * layout.pos_bytes;
                assert_eq!(out[r.clone()], want[r]);
            }
        }
        // A partial match inside an edge.
        let m = tree.longest(&[1, 2, 3, 4, 5, 20, 21, 7]);
        assert_eq!(m.len, 7);
        assert_eq!(tree.longest(&[7, 8]).len, 0);
    }

    #[test]
    fn least_recently_used_prefixes_go_first_past_the_budget() {
        let seqs: Vec<Vec<u32>> = (0..4)
            .map(|s| (0..10).map(|i| 100 * s + i + 1).collect())
            .collect();
        let (layout, _) = cache(&seqs[0], 16);
        // Room for three prefixes of ten positions.
        let mut tree = PrefixTree::new(layout.clone(), layout.bytes(30));
        for s in &seqs[..3] {
            tree.insert(s, &cache(s, 16).1);
        }
        // The first is used again, so the second is the oldest.
        let m = tree.longest(&seqs[0]);
        tree.restore(&m, &mut cache(&seqs[0], 16).1);
        tree.insert(&seqs[3], &cache(&seqs[3], 16).1);
        assert!(tree.bytes() <= layout.bytes(30));
        assert_eq!(tree.longest(&seqs[1]).len, 0);
        for s in [&seqs[0], &seqs[2], &seqs[3]] {
            assert_eq!(tree.longest(s).len, 10);
        }
        // Larger than the whole budget: not kept, nothing evicted.
        let long: Vec<u32> = (500..540).collect();
        tree.insert(&long, &cache(&long, 48).1);
        assert_eq!(tree.longest(&long).len, 0);
        assert_eq!(tree.prefixes(), 3);
    }
}
