//! The only place where Series become slices and back, and where nulls and
//! dtypes are handled. Validation of the sparse layout happens here, once,
//! before any kernel runs.

use polars::prelude::*;
use polars_arrow::array::{Array, FixedSizeListArray, ListArray, PrimitiveArray};
use polars_arrow::bitmap::Bitmap;
use polars_arrow::datatypes::ArrowDataType;
use polars_arrow::offset::{Offsets, OffsetsBuffer};

use crate::error::KernelError;
use crate::kernels::{validate_rows, SparseRow};

fn err(msg: String) -> PolarsError {
    PolarsError::ComputeError(msg.into())
}

/// Schema-time check of a sparse pair: `List(UInt32)` and `List(Float32)`.
/// Runs when the query is planned, so a wrong dtype fails before any data moves.
pub fn check_sparse_fields(fields: &[Field]) -> PolarsResult<()> {
    if fields.len() != 2 {
        return Err(err(format!("expected 2 inputs (gene_idx, values), got {}", fields.len())));
    }
    let want = [
        (&fields[0], DataType::List(Box::new(DataType::UInt32)), "pl.List(pl.UInt32)"),
        (&fields[1], DataType::List(Box::new(DataType::Float32)), "pl.List(pl.Float32)"),
    ];
    for (f, dt, py) in want {
        if f.dtype() != &dt {
            return Err(err(format!(
                "column '{}' has dtype {}, expected {dt}: cast it with pl.col('{}').cast({py})",
                f.name(),
                f.dtype(),
                f.name()
            )));
        }
    }
    Ok(())
}

/// Run `f` on the rows of a (gene_idx, values) pair. Rows that are null in
/// both columns reach `f` as empty rows and are marked in the validity it
/// receives; a row null in only one column, an inner null, or a violation of
/// the layout contract is an error naming the column and row.
pub fn with_sparse_rows<R>(
    gene_idx: &Series,
    values: &Series,
    n_genes: Option<usize>,
    f: impl FnOnce(&[SparseRow<'_>], Option<&Bitmap>) -> Result<R, KernelError>,
) -> PolarsResult<R> {
    check_sparse_fields(&[gene_idx.field().into_owned(), values.field().into_owned()])?;
    let (iname, vname) = (gene_idx.name().to_string(), values.name().to_string());
    if gene_idx.len() != values.len() {
        return Err(err(format!(
            "columns '{iname}' and '{vname}' have different lengths ({} and {})",
            gene_idx.len(),
            values.len()
        )));
    }
    let describe = |e: KernelError| err(e.describe(&iname, &vname));
    let n = gene_idx.len();
    if n == 0 {
        return f(&[], None).map_err(describe);
    }
    let ica = gene_idx.list()?.rechunk();
    let vca = values.list()?.rechunk();
    let iarr: &ListArray<i64> = ica.downcast_iter().next().expect("rechunked: one chunk");
    let varr: &ListArray<i64> = vca.downcast_iter().next().expect("rechunked: one chunk");
    let ichild = iarr.values().as_any().downcast_ref::<PrimitiveArray<u32>>().expect("List(UInt32) checked");
    let vchild = varr.values().as_any().downcast_ref::<PrimitiveArray<f32>>().expect("List(Float32) checked");
    let (ioff, voff) = (iarr.offsets().buffer(), varr.offsets().buffer());
    let (ivalid, vvalid) = (iarr.validity(), varr.validity());
    let is_valid = |b: Option<&Bitmap>, i: usize| b.is_none_or(|b| b.get_bit(i));

    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        match (is_valid(ivalid, i), is_valid(vvalid, i)) {
            (true, true) => {},
            (false, false) => {
                rows.push(SparseRow::default());
                continue;
            },
            (iv, _) => {
                let (null, other) = if iv { (&vname, &iname) } else { (&iname, &vname) };
                return Err(err(format!(
                    "row {i}: '{null}' is null but '{other}' is not; a cell's gene_idx and values must be null together (drop such rows with .drop_nulls())"
                )));
            },
        }
        let (i0, i1) = (ioff[i] as usize, ioff[i + 1] as usize);
        let (v0, v1) = (voff[i] as usize, voff[i + 1] as usize);
        for (child, lo, hi, name) in [(ichild as &dyn Array, i0, i1, &iname), (vchild as &dyn Array, v0, v1, &vname)] {
            if let Some(b) = child.validity() {
                if (lo..hi).any(|k| !b.get_bit(k)) {
                    return Err(err(format!(
                        "column '{name}': row {i} contains a null entry; sparse rows cannot hold nulls (drop or fill them)"
                    )));
                }
            }
        }
        rows.push(SparseRow { gene_idx: &ichild.values()[i0..i1], values: &vchild.values()[v0..v1] });
    }
    validate_rows(&rows, n_genes).map_err(describe)?;
    let validity = ivalid.filter(|b| b.unset_bits() > 0);
    f(&rows, validity).map_err(describe)
}

/// Fits take every row: a null cell is an error naming its row.
pub fn reject_null_rows(validity: Option<&Bitmap>, op: &str) -> Result<(), KernelError> {
    match validity.and_then(|v| (0..v.len()).find(|&i| !v.get_bit(i))) {
        Some(i) => Err(KernelError::Invalid(format!(
            "row {i} is null; drop null cells (lf.drop_nulls()) before {op}"
        ))),
        None => Ok(()),
    }
}

fn offsets(lens: impl Iterator<Item = usize>) -> PolarsResult<OffsetsBuffer<i64>> {
    Ok(Offsets::<i64>::try_from_lengths(lens)?.into())
}

/// A `List(Float32)` Series from row lengths and concatenated values.
pub fn list_f32(name: &str, lens: impl Iterator<Item = usize>, values: Vec<f32>, validity: Option<&Bitmap>) -> PolarsResult<Series> {
    let arr = ListArray::<i64>::new(
        ListArray::<i64>::default_datatype(ArrowDataType::Float32),
        offsets(lens)?,
        PrimitiveArray::from_vec(values).boxed(),
        validity.cloned(),
    );
    Series::from_arrow(name.into(), arr.boxed())
}

/// A `List(UInt32)` Series from row lengths and concatenated values.
pub fn list_u32(name: &str, lens: impl Iterator<Item = usize>, values: Vec<u32>, validity: Option<&Bitmap>) -> PolarsResult<Series> {
    let arr = ListArray::<i64>::new(
        ListArray::<i64>::default_datatype(ArrowDataType::UInt32),
        offsets(lens)?,
        PrimitiveArray::from_vec(values).boxed(),
        validity.cloned(),
    );
    Series::from_arrow(name.into(), arr.boxed())
}

/// An `Array(Float32, width)` Series from a row-major (n_rows, width) buffer.
pub fn array_f32(name: &str, width: usize, values: Vec<f32>, validity: Option<&Bitmap>) -> PolarsResult<Series> {
    let len = values.len() / width;
    let arr = FixedSizeListArray::new(
        FixedSizeListArray::default_datatype(ArrowDataType::Float32, width),
        len,
        PrimitiveArray::from_vec(values).boxed(),
        validity.cloned(),
    );
    Series::from_arrow(name.into(), arr.boxed())
}

/// A plain `Float32` Series with the given validity.
pub fn column_f32(name: &str, values: Vec<f32>, validity: Option<&Bitmap>) -> PolarsResult<Series> {
    let arr = PrimitiveArray::from_vec(values).with_validity(validity.cloned());
    Series::from_arrow(name.into(), arr.boxed())
}
