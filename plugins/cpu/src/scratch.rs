//! Zeroed work rows kept per thread: an op asks for a row of `n` values
//! ([`f32s`], [`f64s`]) and gives it back when the row drops, so the
//! next op on the thread gets the same memory. Once the rows have grown
//! to a model's sizes, running its ops allocates nothing (a decode step
//! runs a few hundred ops per token).

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Rows given back, per element type; at most this many kept per thread
/// (an op uses a handful at once).
const KEPT: usize = 16;

thread_local! {
    static F32S: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static F64S: RefCell<Vec<Vec<f64>>> = const { RefCell::new(Vec::new()) };
}

/// A zeroed row from the thread's kept rows; given back on drop.
pub struct Row<T: Kept> {
    v: Vec<T>,
}

/// An element type with rows kept per thread.
pub trait Kept: Copy + Default + 'static {
    /// `f` over the thread's kept rows; `None` while the thread exits
    /// (they are gone).
    fn with_kept<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> Option<R>;
}

impl Kept for f32 {
    fn with_kept<R>(f: impl FnOnce(&mut Vec<Vec<f32>>) -> R) -> Option<R> {
        F32S.try_with(|k| f(&mut k.borrow_mut())).ok()
    }
}

impl Kept for f64 {
    fn with_kept<R>(f: impl FnOnce(&mut Vec<Vec<f64>>) -> R) -> Option<R> {
        F64S.try_with(|k| f(&mut k.borrow_mut())).ok()
    }
}

impl<T: Kept> Row<T> {
    fn new(n: usize) -> Row<T> {
        // The kept row with the most room, so that a small request does
        // not take the row a large one grew.
        let mut v = T::with_kept(|kept| {
            let best = (0..kept.len()).max_by_key(|&i| kept[i].capacity())?;
            Some(kept.swap_remove(best))
        })
        .flatten()
        .unwrap_or_default();
        v.clear();
        v.resize(n, T::default());
        Row { v }
    }
}

impl<T: Kept> Drop for Row<T> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.v);
        // Freed when enough are kept, or when the thread exits.
        T::with_kept(|kept| {
            if kept.len() < KEPT {
                kept.push(v);
            }
        });
    }
}

impl<T: Kept> Deref for Row<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.v
    }
}

impl<T: Kept> DerefMut for Row<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.v
    }
}

/// `n` zeroed f32s.
pub fn f32s(n: usize) -> Row<f32> {
    Row::new(n)
}

/// `n` zeroed f64s.
pub fn f64s(n: usize) -> Row<f64> {
    Row::new(n)
}

impl<'a, T: Kept> IntoIterator for &'a Row<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.v.iter()
    }
}

impl<'a, T: Kept> IntoIterator for &'a mut Row<T> {
    type Item = &'a mut T;
    type IntoIter = std::slice::IterMut<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.v.iter_mut()
    }
}
