//! Tensor descriptions: a type, extents and byte strides, what the host
//! and every backend agree a tensor is (the safe side of `KilnTensor`).

use crate::DType;

/// A tensor's type, shape and byte strides (dimension 0 innermost).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub dtype: DType,
    pub ne: [usize; 4],
    pub nb: [usize; 4],
}

impl Desc {
    /// A densely packed tensor.
    #[inline]
    pub fn contiguous(dtype: DType, ne: [usize; 4]) -> Desc {
        let row = dtype.row_bytes(ne[0]).unwrap_or(0);
        let nb0 = dtype.block_bytes();
        Desc {
            dtype,
            ne,
            nb: [nb0, row, row * ne[1], row * ne[1] * ne[2]],
        }
    }

    #[inline]
    pub fn n_elements(&self) -> usize {
        self.ne.iter().product()
    }

    #[inline]
    pub fn n_rows(&self) -> usize {
        self.ne[1] * self.ne[2] * self.ne[3]
    }

    /// Bytes from the first byte to one past the last, or `None` on
    /// overflow or a malformed quantized row.
    #[inline]
    pub fn extent(&self) -> Option<usize> {
        let row = if self.dtype.is_quantized() {
            self.dtype.row_bytes(self.ne[0])?
        } else {
            (self.ne[0] - 1)
                .checked_mul(self.nb[0])?
                .checked_add(self.dtype.block_bytes())?
        };
        let mut end = row;
        for d in 1..4 {
            end = end.checked_add((self.ne[d] - 1).checked_mul(self.nb[d])?)?;
        }
        Some(end)
    }

    /// Checks what every op needs of a tensor: no empty extent, whole
    /// blocks in contiguous quantized rows, an extent that does not
    /// overflow.
    pub fn validate(&self) -> Result<(), String> {
        if self.ne.contains(&0) {
            return Err(format!("empty extent in {:?}", self.ne));
        }
        if self.dtype.is_quantized() {
            if !self.ne[0].is_multiple_of(self.dtype.block_len()) {
                return Err(format!(
                    "{} rows need a multiple of {} elements, got ne[0] = {}",
                    self.dtype,
                    self.dtype.block_len(),
                    self.ne[0]
                ));
            }
            if self.nb[0] != self.dtype.block_bytes() {
                return Err(format!(
                    "{} rows must be contiguous (nb[0] = {}, got {})",
                    self.dtype,
                    self.dtype.block_bytes(),
                    self.nb[0]
                ));
            }
        }
        if self.extent().is_none() {
            return Err("tensor extent overflows".to_string());
        }
        Ok(())
    }
}
