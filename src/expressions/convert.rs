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
    let islices = row_slices::<u32>(gene_idx.list()?, &iname)?;
    let vslices = row_slices::<f32>(values.list()?, &vname)?;
    let mut rows = Vec::with_capacity(islices.len());
    let mut any_null = false;
    for (i, (gi, v)) in islices.iter().zip(&vslices).enumerate() {
        match (gi, v) {
            (Some(gi), Some(v)) => rows.push(SparseRow { gene_idx: gi, values: v }),
            (None, None) => {
                any_null = true;
                rows.push(SparseRow::default());
            },
            (gi, _) => {
                let (null, other) = if gi.is_some() { (&vname, &iname) } else { (&iname, &vname) };
                return Err(err(format!(
                    "row {i}: '{null}' is null but '{other}' is not; a cell's gene_idx and values must be null together (drop such rows with .drop_nulls())"
                )));
            },
        }
    }
    validate_rows(&rows, n_genes).map_err(describe)?;
    let validity: Option<Bitmap> = any_null.then(|| islices.iter().map(|s| s.is_some()).collect());
    f(&rows, validity.as_ref()).map_err(describe)
}

/// Each row's slice of the list's values (`None` for a null row), read chunk
/// by chunk without rechunking. An inner null is an error naming the row.
fn row_slices<'a, T: polars_arrow::types::NativeType>(ca: &'a ListChunked, name: &str) -> PolarsResult<Vec<Option<&'a [T]>>> {
    let mut out = Vec::with_capacity(ca.len());
    for arr in ca.downcast_iter() {
        let child = arr.values().as_any().downcast_ref::<PrimitiveArray<T>>().ok_or_else(|| {
            err(format!("column '{name}': unexpected inner dtype {:?}", arr.values().dtype()))
        })?;
        let (off, vals, inner) = (arr.offsets().buffer(), child.values(), child.validity());
        for i in 0..arr.len() {
            if !arr.is_valid(i) {
                out.push(None);
                continue;
            }
            let (lo, hi) = (off[i] as usize, off[i + 1] as usize);
            if inner.is_some_and(|b| (lo..hi).any(|k| !b.get_bit(k))) {
                return Err(err(format!(
                    "column '{name}': row {} contains a null entry; sparse rows cannot hold nulls (drop or fill them)",
                    out.len()
                )));
            }
            out.push(Some(&vals[lo..hi]));
        }
    }
    Ok(out)
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

/// A `List(T)` Series (`List(Float32)`, `List(UInt32)`, ...) from row lengths
/// and the rows' values concatenated.
pub fn list_series<T: polars_arrow::types::NativeType>(
    name: &str,
    lens: impl Iterator<Item = usize>,
    values: Vec<T>,
    validity: Option<&Bitmap>,
) -> PolarsResult<Series> {
    let arr = ListArray::<i64>::new(
        ListArray::<i64>::default_datatype(ArrowDataType::from(T::PRIMITIVE)),
        offsets(lens)?,
        PrimitiveArray::from_vec(values).boxed(),
        validity.cloned(),
    );
    Series::from_arrow(name.into(), arr.boxed())
}

/// An `Array(Float32, width)` Series from a row-major (n_rows, width) buffer.
pub fn array_f32(name: &str, width: usize, values: Vec<f32>, validity: Option<&Bitmap>) -> PolarsResult<Series> {
    array_of(name, width, values, validity)
}

/// An `Array(T, width)` Series from a row-major (n_rows, width) buffer.
pub fn array_of<T: polars_arrow::types::NativeType>(
    name: &str,
    width: usize,
    values: Vec<T>,
    validity: Option<&Bitmap>,
) -> PolarsResult<Series> {
    let len = values.len() / width;
    let arr = FixedSizeListArray::new(
        FixedSizeListArray::default_datatype(ArrowDataType::from(T::PRIMITIVE), width),
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

/// Schema-time check of an embedding column: `Array(Float32, d)`; returns `d`.
/// Other dtypes are refused, not cast: a float64 or list embedding is usually
/// a mistake upstream, and the fix is one `.cast` the message spells out.
pub fn check_embedding_field(f: &Field) -> PolarsResult<usize> {
    if let DataType::Array(inner, d) = f.dtype() {
        if **inner == DataType::Float32 && *d > 0 {
            return Ok(*d);
        }
    }
    let width = match f.dtype() {
        DataType::Array(_, d) => d.to_string(),
        _ => "d".to_string(),
    };
    Err(err(format!(
        "column '{}' has dtype {}, expected Array(Float32, d) (one float32 vector per cell): cast it with pl.col('{}').cast(pl.Array(pl.Float32, {width}))",
        f.name(),
        f.dtype(),
        f.name()
    )))
}

/// The rows of an `Array(Float32, d)` column as one row-major buffer (borrowed
/// when the column is one chunk) and `d`. Null rows and null entries are errors
/// naming the column and row: callers that keep nulls use `embedding_view`.
pub fn embedding_rows(s: &Series) -> PolarsResult<(std::borrow::Cow<'_, [f32]>, usize)> {
    let (chunks, d, validity) = embedding_view(s)?;
    if let Some(row) = validity.and_then(|v| (0..v.len()).find(|&i| !v.get_bit(i))) {
        return Err(err(format!("column '{}' is null at row {row}; drop null cells first (.drop_nulls('{}'))", s.name(), s.name())));
    }
    Ok((if chunks.len() == 1 { std::borrow::Cow::Borrowed(chunks[0]) } else { chunks.concat().into() }, d))
}

/// The value slices of an embedding column chunk by chunk, its width and its
/// row validity (None: no null rows). An inner null inside a valid row is an
/// error naming the row.
pub fn embedding_view(s: &Series) -> PolarsResult<(Vec<&[f32]>, usize, Option<Bitmap>)> {
    let d = check_embedding_field(&s.field())?;
    let ca = s.array()?;
    let mut chunks = Vec::with_capacity(ca.chunks().len());
    let mut offset = 0;
    let mut any_null = false;
    for arr in ca.downcast_iter() {
        let child = arr
            .values()
            .as_any()
            .downcast_ref::<PrimitiveArray<f32>>()
            .ok_or_else(|| err(format!("column '{}': unexpected inner dtype {:?}", s.name(), arr.values().dtype())))?;
        let vals = child.values().as_slice();
        if let Some(inner) = child.validity() {
            for i in 0..arr.len() {
                if arr.is_valid(i) && (i * d..(i + 1) * d).any(|k| !inner.get_bit(k)) {
                    return Err(err(format!(
                        "column '{}': row {} contains a null entry; embeddings cannot hold nulls (drop or fill those cells)",
                        s.name(),
                        offset + i
                    )));
                }
            }
        }
        any_null |= arr.null_count() > 0;
        chunks.push(&vals[..arr.len() * d]);
        offset += arr.len();
    }
    let validity: Option<Bitmap> =
        any_null.then(|| ca.downcast_iter().flat_map(|arr| (0..arr.len()).map(move |i| arr.is_valid(i))).collect());
    Ok((chunks, d, validity))
}
