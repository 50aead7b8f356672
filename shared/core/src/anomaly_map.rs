//! Anomaly maps: patch scores upsampled to the model input and Gaussian-blurred, and
//! resampling for evaluation and display.

use serde::{Deserialize, Serialize};

/// A dense single-channel map of anomaly scores, row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyMap {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `height * width` scores.
    pub data: Vec<f32>,
}

/// Source positions and weights of half-pixel-centred bilinear resampling along one axis
/// (PyTorch `interpolate(mode="bilinear", align_corners=False)`, no antialias).
fn axis_weights(n_in: usize, n_out: usize) -> Vec<(usize, usize, f32)> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            (i0, i1, (src - i0 as f64) as f32)
        })
        .collect()
}

impl AnomalyMap {
    /// A map from row-major data.
    pub fn new(height: usize, width: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            data.len(),
            height * width,
            "map data does not match its size"
        );
        Self {
            height,
            width,
            data,
        }
    }

    /// Largest value.
    pub fn max(&self) -> f32 {
        self.data.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }

    /// Bilinear resampling to another size (half-pixel centres, edge clamp, no antialias).
    pub fn resize(&self, height: usize, width: usize) -> AnomalyMap {
        if (height, width) == (self.height, self.width) {
            return self.clone();
        }
        let ys = axis_weights(self.height, height);
        let xs = axis_weights(self.width, width);
        let mut rows = vec![0f32; height * self.width];
        for (o, &(y0, y1, ly)) in ys.iter().enumerate() {
            let (a, b) = (
                &self.data[y0 * self.width..][..self.width],
                &self.data[y1 * self.width..][..self.width],
            );
            for (x, r) in rows[o * self.width..][..self.width].iter_mut().enumerate() {
                *r = a[x] * (1.0 - ly) + b[x] * ly;
            }
        }
        let mut data = vec![0f32; height * width];
        for y in 0..height {
            let row = &rows[y * self.width..][..self.width];
            for (x, &(x0, x1, lx)) in xs.iter().enumerate() {
                data[y * width + x] = row[x0] * (1.0 - lx) + row[x1] * lx;
            }
        }
        AnomalyMap {
            height,
            width,
            data,
        }
    }

    /// Separable Gaussian blur with reflected borders; kernel radius `int(4 sigma + 0.5)`.
    pub fn blur(&self, sigma: f32) -> AnomalyMap {
        if sigma <= 0.0 {
            return self.clone();
        }
        let kernel = gaussian_kernel(sigma);
        let r = kernel.len() / 2;
        let (h, w) = (self.height, self.width);
        let reflect = |i: isize, n: usize| -> usize {
            let n = n as isize;
            if n == 1 {
                return 0;
            }
            if (0..n).contains(&i) {
                return i as usize;
            }
            let period = 2 * (n - 1);
            let m = i.rem_euclid(period);
            (if m < n { m } else { period - m }) as usize
        };
        use rayon::prelude::*;
        // Horizontal pass: each row padded with reflected borders, then a branch-free
        // sweep per tap that the compiler vectorises.
        let mut tmp = vec![0f32; h * w];
        tmp.par_chunks_mut(w)
            .zip(self.data.par_chunks(w))
            .for_each(|(out_row, row)| {
                let padded: Vec<f32> = (0..w + 2 * r)
                    .map(|i| row[reflect(i as isize - r as isize, w)])
                    .collect();
                for (k, kv) in kernel.iter().enumerate() {
                    for (o, v) in out_row.iter_mut().zip(&padded[k..k + w]) {
                        *o += kv * v;
                    }
                }
            });
        // Vertical pass: each output row sums reflected source rows.
        let mut out = vec![0f32; h * w];
        out.par_chunks_mut(w).enumerate().for_each(|(y, out_row)| {
            for (k, kv) in kernel.iter().enumerate() {
                let yi = reflect(y as isize + k as isize - r as isize, h);
                for (o, v) in out_row.iter_mut().zip(&tmp[yi * w..(yi + 1) * w]) {
                    *o += kv * v;
                }
            }
        });
        AnomalyMap {
            height: h,
            width: w,
            data: out,
        }
    }

    /// The map as a little-endian float32 `.npy` file (NumPy format 1.0), in memory: the
    /// one encoder of maps, for files and the object store alike.
    pub fn to_npy(&self) -> Vec<u8> {
        let header = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
            self.height, self.width
        );
        let unpadded = 10 + header.len() + 1;
        let pad = (64 - unpadded % 64) % 64;
        let mut bytes = Vec::with_capacity(unpadded + pad + 4 * self.data.len());
        bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
        bytes.extend_from_slice(&((header.len() + pad + 1) as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(b' ', pad));
        bytes.push(b'\n');
        for v in &self.data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes
    }

    /// Parses a 2-D (or 1 x H x W) C-order little-endian float32 `.npy` file, as
    /// [`AnomalyMap::to_npy`] or NumPy writes it: the one decoder of maps.
    pub fn from_npy(bytes: &[u8]) -> Result<AnomalyMap, String> {
        if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
            return Err("not a .npy file".into());
        }
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = std::str::from_utf8(bytes.get(10..10 + hlen).ok_or("truncated header")?)
            .map_err(|e| e.to_string())?;
        if !header.contains("'<f4'") || header.contains("'fortran_order': True") {
            return Err("only C-order little-endian float32 maps are read".into());
        }
        let shape = header
            .split("'shape': (")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .ok_or("no shape")?;
        let dims: Vec<usize> = shape
            .split(',')
            .filter_map(|d| d.trim().parse().ok())
            .collect();
        let (h, w) = match dims.as_slice() {
            [h, w] | [1, h, w] => (*h, *w),
            _ => return Err(format!("map shape ({shape}) is not 2-D")),
        };
        let body = &bytes[10 + hlen..];
        if Some(body.len()) != h.checked_mul(w).and_then(|n| n.checked_mul(4)) {
            return Err("data size does not match the shape".into());
        }
        let data = body
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(AnomalyMap {
            height: h,
            width: w,
            data,
        })
    }

    /// Writes the map as a `.npy` file ([`AnomalyMap::to_npy`]).
    pub fn write_npy(&self, path: &std::path::Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_npy())
    }

    /// Reads a `.npy` file ([`AnomalyMap::from_npy`]).
    pub fn read_npy(path: &std::path::Path) -> Result<AnomalyMap, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        Self::from_npy(&bytes)
    }
}

/// Normalised 1-D Gaussian kernel of radius `int(4 sigma + 0.5)`.
pub fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    let r = (4.0 * sigma + 0.5) as usize;
    let mut k: Vec<f32> = (0..=2 * r)
        .map(|i| {
            let x = i as f32 - r as f32;
            (-x * x / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= sum);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_matches_half_pixel_bilinear() {
        let m = AnomalyMap::new(2, 2, vec![0.0, 1.0, 2.0, 3.0]);
        let r = m.resize(4, 4);
        // PyTorch F.interpolate(size=4, bilinear, align_corners=False) first row.
        let want = [0.0, 0.25, 0.75, 1.0];
        for (a, b) in r.data[..4].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{:?}", &r.data[..4]);
        }
        assert!((r.data[15] - 3.0).abs() < 1e-6);
    }

    #[test]
    fn blur_keeps_mass_and_spreads_a_peak() {
        let mut data = vec![0f32; 41 * 41];
        data[20 * 41 + 20] = 1.0;
        let b = AnomalyMap::new(41, 41, data).blur(2.0);
        let sum: f32 = b.data.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "{sum}");
        assert!(b.data[20 * 41 + 20] < 0.1 && b.data[20 * 41 + 21] > 0.0);
        assert_eq!(gaussian_kernel(4.0).len(), 33);
    }

    #[test]
    fn npy_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let m = AnomalyMap::new(3, 5, (0..15).map(|v| v as f32 * 0.5).collect());
        let p = dir.path().join("m.npy");
        m.write_npy(&p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!((bytes.len() - 60) % 4, 0);
        assert_eq!(AnomalyMap::read_npy(&p).unwrap(), m);
        // The in-memory codec is the same one; bad input is refused, not a panic.
        assert_eq!(bytes, m.to_npy());
        assert_eq!(AnomalyMap::from_npy(&m.to_npy()).unwrap(), m);
        assert!(AnomalyMap::from_npy(b"garbage").is_err());
        assert!(AnomalyMap::from_npy(&bytes[..bytes.len() - 4]).is_err());
        let mut fortran = bytes.clone();
        let at = fortran.windows(5).position(|w| w == b"False").unwrap();
        fortran[at..at + 5].copy_from_slice(b"True ");
        assert!(AnomalyMap::from_npy(&fortran).is_err());
    }
}
