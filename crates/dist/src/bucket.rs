//! Gradient buckets, as [`crate::Group::all_reduce_mean`] and the overlapped reduction
//! share them: consecutive tensors of one kind, flattened into one message.

use tch::Tensor;

/// The indices of `tensors`, taken in `order`, grouped into buckets of consecutive tensors of
/// one kind that hold at most `bucket_bytes` together (a larger tensor travels alone).
pub(crate) fn buckets(tensors: &[Tensor], order: impl Iterator<Item = usize>, bucket_bytes: usize) -> Vec<Vec<usize>> {
    buckets_of_units(tensors, order, bucket_bytes, |_| None)
}

/// [`buckets`], except that consecutive tensors of one `unit` (`Some`) form one bucket of
/// their own, whatever its size.
pub(crate) fn buckets_of_units(
    tensors: &[Tensor],
    order: impl Iterator<Item = usize>,
    bucket_bytes: usize,
    unit: impl Fn(usize) -> Option<usize>,
) -> Vec<Vec<usize>> {
    let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
    let mut buckets: Vec<Vec<usize>> = vec![];
    let mut size = 0;
    for i in order {
        let fits = buckets.last().is_some_and(|b| {
            tensors[b[0]].kind() == tensors[i].kind()
                && unit(b[0]) == unit(i)
                && (unit(i).is_some() || size + bytes(&tensors[i]) <= bucket_bytes)
        });
        if !fits {
            buckets.push(vec![]);
            size = 0;
        }
        buckets.last_mut().expect("a bucket").push(i);
        size += bytes(&tensors[i]);
    }
    buckets
}

/// The tensors of `bucket` as one flat tensor.
pub(crate) fn flatten(bucket: &[Tensor]) -> Tensor {
    tch::no_grad(|| Tensor::cat(&bucket.iter().map(|t| t.reshape(-1)).collect::<Vec<_>>(), 0))
}

/// Writes `sum / world` of a flattened bucket back into its tensors, in order.
pub(crate) fn write_mean(sum: Tensor, bucket: &[Tensor], world: usize) {
    let mean = sum / world as f64;
    let mut offset = 0;
    tch::no_grad(|| {
        for t in bucket {
            let n = t.numel() as i64;
            t.shallow_clone().copy_(&mean.narrow(0, offset, n).view_as(t));
            offset += n;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn buckets_hold_consecutive_tensors_of_one_kind_within_the_size() {
        let t = |n: i64, kind: Kind| Tensor::zeros([n], (kind, Device::Cpu));
        // 8, 8, 40, 8 bytes of f32, then 4 bytes of bf16, in 16-byte buckets.
        let tensors =
            [t(2, Kind::Float), t(2, Kind::Float), t(10, Kind::Float), t(2, Kind::Float), t(2, Kind::BFloat16)];
        assert_eq!(buckets(&tensors, 0..5, 16), [vec![0, 1], vec![2], vec![3], vec![4]]);
        assert_eq!(buckets(&tensors, (0..5).rev(), 16), [vec![4], vec![3], vec![2], vec![1, 0]]);
        let grads = [Tensor::from_slice(&[1.0f32, 2.0]), Tensor::from_slice(&[3.0f32])];
        let flat = flatten(&grads);
        write_mean(flat * 2.0, &grads, 2);
        assert_eq!(Vec::<f32>::try_from(&grads[0]).unwrap(), [1.0, 2.0]);
        assert_eq!(Vec::<f32>::try_from(&grads[1]).unwrap(), [3.0]);
    }
}
