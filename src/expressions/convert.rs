//! The only place where Series become slices and back, and where nulls and
//! dtypes are handled. Validation of the sparse layout happens here, once,
//! before any kernel runs.

use polars::prelude::*;
use polars_arrow::array::{Array, FixedSizeListArray, ListArray, PrimitiveArray};
use polars_arrow::bitmap::Bitmap;
use polars_arrow::datatypes::ArrowDataType;
use polars_arrow::offset::{Offsets, OffsetsBuffer};

use crate::error::KernelError;
use crate::kernels::cells::TokenRow;
use crate::kernels::{validate_rows, SparseRow};

fn err(msg: String) -> PolarsError {
    PolarsError::ComputeError(msg.into())
}

/// A numeric column's values as float64; a null is an error naming it.
pub fn f64_values(s: &Series) -> PolarsResult<Vec<f64>> {
    polars_ensure!(s.dtype().is_primitive_numeric(), ComputeError: "column '{}' has dtype {}, expected numbers", s.name(), s.dtype());
    let v = s.cast(&DataType::Float64)?;
    let v = v.f64()?;
    if let Some(i) = v.iter().position(|x| x.is_none()) {
        polars_bail!(ComputeError: "column '{}' is null at row {i}", s.name());
    }
    Ok(v.into_no_null_iter().collect())
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
    let (pairs, validity) = paired_rows::<u32, f32>(gene_idx.list()?, values.list()?, &iname, &vname)?;
    let rows: Vec<SparseRow<'_>> = pairs.into_iter().map(|(gene_idx, values)| SparseRow { gene_idx, values }).collect();
    validate_rows(&rows, n_genes).map_err(describe)?;
    f(&rows, validity.as_ref()).map_err(describe)
}

/// The rows of two parallel list columns as slices. A row null in both
/// reaches the caller as two empty slices and is marked in the returned
/// validity (`None`: no null row); a row null in only one is an error.
#[allow(clippy::type_complexity)] // the pairs of slices and the validity, as named above
fn paired_rows<'a, A: polars_arrow::types::NativeType, B: polars_arrow::types::NativeType>(
    a: &'a ListChunked,
    b: &'a ListChunked,
    aname: &str,
    bname: &str,
) -> PolarsResult<(Vec<(&'a [A], &'a [B])>, Option<Bitmap>)> {
    let aslices = row_slices::<A>(a, aname)?;
    let bslices = row_slices::<B>(b, bname)?;
    let mut rows = Vec::with_capacity(aslices.len());
    let mut any_null = false;
    for (i, pair) in aslices.iter().zip(&bslices).enumerate() {
        match pair {
            (Some(x), Some(y)) => rows.push((*x, *y)),
            (None, None) => {
                any_null = true;
                rows.push((&[][..], &[][..]));
            },
            (x, _) => {
                let (null, other) = if x.is_some() { (bname, aname) } else { (aname, bname) };
                return Err(err(format!(
                    "row {i}: '{null}' is null but '{other}' is not; a cell's {aname} and {bname} must be null together (drop such rows with .drop_nulls())"
                )));
            },
        }
    }
    let validity: Option<Bitmap> = any_null.then(|| aslices.iter().map(|s| s.is_some()).collect());
    Ok((rows, validity))
}

/// Schema-time check of a published sparse pair: a list of integers (gene
/// ids) and a list of numbers (values), as `to_cells` reads them.
pub fn check_token_fields(fields: &[Field]) -> PolarsResult<()> {
    let [genes, values] = fields else {
        return Err(err(format!("expected 2 inputs (gene ids, values), got {}", fields.len())));
    };
    let inner = |f: &Field| match f.dtype() {
        DataType::List(t) => Some((**t).clone()),
        _ => None,
    };
    if !inner(genes).is_some_and(|t| t.is_integer()) {
        return Err(err(format!(
            "column '{}' has dtype {}, expected a list of integer gene ids (e.g. List(Int64))",
            genes.name(),
            genes.dtype()
        )));
    }
    if !inner(values).is_some_and(|t| t.is_primitive_numeric()) {
        return Err(err(format!(
            "column '{}' has dtype {}, expected a list of numbers (e.g. List(Float32))",
            values.name(),
            values.dtype()
        )));
    }
    Ok(())
}

/// Run `f` on the rows of a published (gene ids, values) pair, any integer
/// and numeric list dtypes (cast here to Int64 and Float32; a no-op where
/// they are already). Nulls as in [`with_sparse_rows`].
pub fn with_token_rows<R>(
    genes: &Series,
    values: &Series,
    f: impl FnOnce(&[TokenRow<'_>], Option<&Bitmap>) -> Result<R, KernelError>,
) -> PolarsResult<R> {
    check_token_fields(&[genes.field().into_owned(), values.field().into_owned()])?;
    let (gname, vname) = (genes.name().to_string(), values.name().to_string());
    if genes.len() != values.len() {
        return Err(err(format!("columns '{gname}' and '{vname}' have different lengths ({} and {})", genes.len(), values.len())));
    }
    // Strict: a UInt64 id beyond Int64 must be an error, not a null.
    let ids = genes.strict_cast(&DataType::List(Box::new(DataType::Int64))).map_err(|_| {
        err(format!("column '{gname}' holds a gene id above {} (beyond Int64); ids must fit a signed 64-bit integer", i64::MAX))
    })?;
    let vals = values.cast(&DataType::List(Box::new(DataType::Float32)))?;
    let (pairs, validity) = paired_rows::<i64, f32>(ids.list()?, vals.list()?, &gname, &vname)?;
    let rows: Vec<TokenRow<'_>> = pairs.into_iter().map(|(genes, values)| TokenRow { genes, values }).collect();
    f(&rows, validity.as_ref()).map_err(|e| err(e.describe(&gname, &vname)))
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
#[allow(clippy::type_complexity)] // the chunks' slices, the width and the validity, as named above
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

/// Fuzzing of the conversion above (issue 8): arbitrary Series — several
/// chunks, sliced, nulls outside and inside the lists, ragged, unsorted,
/// out-of-range, non-finite — must give either exactly the rows that went in,
/// or an error naming a column and a row that really is bad. Never a panic.
/// Bounded: 512 generated cases per property (a few seconds in CI).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// One cell as it is generated: each side null, or a list that may hold
    /// an inner null at some position.
    #[derive(Debug, Clone)]
    struct Cell {
        idx: Option<Vec<Option<u32>>>,
        vals: Option<Vec<Option<f32>>>,
    }

    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            8 => (0u32..50).prop_map(|v| v as f32 * 0.5),
            1 => Just(f32::NAN),
            1 => Just(f32::INFINITY),
            1 => Just(f32::NEG_INFINITY),
            1 => Just(-1.0f32),
        ]
    }

    fn side<T: std::fmt::Debug + Clone + 'static>(
        item: impl Strategy<Value = T> + 'static,
    ) -> impl Strategy<Value = Option<Vec<Option<T>>>> {
        let entry = prop_oneof![20 => item.prop_map(Some), 1 => Just(None)];
        prop_oneof![12 => proptest::collection::vec(entry, 0..6).prop_map(Some), 1 => Just(None)]
    }

    fn cell() -> impl Strategy<Value = Cell> {
        prop_oneof![
            // Mostly well-formed: sorted unique indices with matching finite values.
            6 => proptest::collection::btree_set(0u32..24, 0..6).prop_flat_map(|set| {
                let n = set.len();
                (Just(set), proptest::collection::vec(0u32..50, n))
            }).prop_map(|(set, v)| Cell {
                idx: Some(set.into_iter().map(Some).collect()),
                vals: Some(v.into_iter().map(|v| Some(v as f32)).collect()),
            }),
            1 => Just(Cell { idx: None, vals: None }),
            3 => (side(0u32..24), side(value())).prop_map(|(idx, vals)| Cell { idx, vals }),
        ]
    }

    fn list_chunk<T: polars_arrow::types::NativeType>(
        name: &str,
        cells: &[Option<Vec<Option<T>>>],
    ) -> Series {
        let lens = cells.iter().map(|c| c.as_ref().map_or(0, |v| v.len()));
        let flat: Vec<Option<T>> = cells
            .iter()
            .flat_map(|c| c.clone().unwrap_or_default())
            .collect();
        let values = PrimitiveArray::<T>::from(flat);
        let validity: Bitmap = cells.iter().map(|c| c.is_some()).collect();
        let arr = ListArray::<i64>::new(
            ListArray::<i64>::default_datatype(ArrowDataType::from(T::PRIMITIVE)),
            offsets(lens).unwrap(),
            values.boxed(),
            Some(validity),
        );
        Series::from_arrow(name.into(), arr.boxed()).unwrap()
    }

    /// The column split into chunks at `cuts`, then sliced to `[start, start + len)`.
    fn column<T: polars_arrow::types::NativeType>(
        name: &str,
        cells: &[Option<Vec<Option<T>>>],
        cuts: &[usize],
        start: usize,
        len: usize,
    ) -> Series {
        let mut bounds: Vec<usize> = cuts.iter().map(|&c| c % (cells.len() + 1)).collect();
        bounds.extend([0, cells.len()]);
        bounds.sort_unstable();
        bounds.dedup();
        let mut s = list_chunk::<T>(name, &cells[..0]);
        for w in bounds.windows(2) {
            s.append(&list_chunk::<T>(name, &cells[w[0]..w[1]]))
                .unwrap();
        }
        s.slice(start as i64, len)
    }

    /// Whether one cell breaks the layout contract (the reference the
    /// conversion is checked against, written independently of it).
    fn is_bad(c: &Cell, n_genes: Option<usize>) -> bool {
        let inner_null = c.idx.iter().flatten().any(|x| x.is_none())
            || c.vals.iter().flatten().any(|x| x.is_none());
        inner_null
            || match (&c.idx, &c.vals) {
                (None, None) => false,
                (Some(_), None) | (None, Some(_)) => true,
                (Some(i), Some(v)) => {
                    i.len() != v.len()
                        || i.windows(2).any(|w| w[1] <= w[0])
                        || n_genes.is_some_and(|n| i.iter().flatten().any(|&g| g as usize >= n))
                        || v.iter().flatten().any(|x| !x.is_finite())
                }
            }
    }

    /// Every "row N" the message names.
    fn named_rows(msg: &str) -> Vec<usize> {
        msg.match_indices("row ")
            .filter_map(|(at, _)| {
                let digits: String = msg[at + 4..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                digits.parse().ok()
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn sparse_rows_are_exact_or_a_named_error(
            cells in proptest::collection::vec(cell(), 0..40),
            cuts in proptest::collection::vec(0usize..64, 0..4),
            trim in (0usize..4, 0usize..4),
            n_genes in prop_oneof![Just(None), (1usize..30).prop_map(Some)],
        ) {
            let start = trim.0.min(cells.len());
            let len = cells.len() - start - trim.1.min(cells.len() - start);
            let gi = column::<u32>("gene_idx", &cells.iter().map(|c| c.idx.clone()).collect::<Vec<_>>(), &cuts, start, len);
            let mut vcuts = cuts.clone();
            vcuts.reverse();
            vcuts.push(3); // the two columns chunked differently
            let vals = column::<f32>("values", &cells.iter().map(|c| c.vals.clone()).collect::<Vec<_>>(), &vcuts, start, len);
            let cells = &cells[start..start + len];
            let got = with_sparse_rows(&gi, &vals, n_genes, |rows, validity| {
                let owned: Vec<(Vec<u32>, Vec<f32>)> = rows.iter().map(|r| (r.gene_idx.to_vec(), r.values.to_vec())).collect();
                let valid: Option<Vec<bool>> = validity.map(|v| v.iter().collect());
                Ok((owned, valid))
            });
            let bad: Vec<usize> = (0..cells.len()).filter(|&i| is_bad(&cells[i], n_genes)).collect();
            match got {
                Ok((rows, valid)) => {
                    prop_assert!(bad.is_empty(), "accepted bad rows {:?}", bad);
                    prop_assert_eq!(rows.len(), cells.len());
                    for (i, (c, (ri, rv))) in cells.iter().zip(&rows).enumerate() {
                        let want_i: Vec<u32> = c.idx.clone().unwrap_or_default().into_iter().flatten().collect();
                        let want_v: Vec<f32> = c.vals.clone().unwrap_or_default().into_iter().flatten().collect();
                        prop_assert_eq!(ri, &want_i, "row {}", i);
                        prop_assert_eq!(rv, &want_v, "row {}", i);
                    }
                    let want_valid: Vec<bool> = cells.iter().map(|c| c.idx.is_some()).collect();
                    match valid {
                        Some(v) => prop_assert_eq!(v, want_valid),
                        None => prop_assert!(want_valid.iter().all(|&x| x)),
                    }
                },
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(!bad.is_empty(), "refused good rows: {}", msg);
                    prop_assert!(msg.contains("'gene_idx'") || msg.contains("'values'"), "{}", msg);
                    let named = named_rows(&msg);
                    prop_assert!(!named.is_empty() && named.iter().all(|r| bad.contains(r)), "{} (bad rows {:?})", msg, bad);
                },
            }
        }

        #[test]
        fn embeddings_are_exact_or_a_named_error(
            d in 1usize..5,
            rows in proptest::collection::vec(prop_oneof![
                8 => proptest::collection::vec(prop_oneof![30 => (-9i32..9).prop_map(|v| Some(v as f32)), 1 => Just(None)], 4).prop_map(Some),
                1 => Just(None),
            ], 0..30),
            cut in 0usize..31,
            start in 0usize..3,
        ) {
            let chunk = |rows: &[Option<Vec<Option<f32>>>]| {
                let flat: Vec<Option<f32>> = rows.iter().flat_map(|r| r.clone().unwrap_or(vec![Some(0.0); 4])[..d].to_vec()).collect();
                let validity: Bitmap = rows.iter().map(|r| r.is_some()).collect();
                let arr = FixedSizeListArray::new(
                    FixedSizeListArray::default_datatype(ArrowDataType::Float32, d),
                    rows.len(),
                    PrimitiveArray::<f32>::from(flat).boxed(),
                    Some(validity),
                );
                Series::from_arrow("X_pca".into(), arr.boxed()).unwrap()
            };
            let cut = cut.min(rows.len());
            let mut s = chunk(&rows[..cut]);
            s.append(&chunk(&rows[cut..])).unwrap();
            let start = start.min(rows.len());
            let s = s.slice(start as i64, rows.len() - start);
            let rows = &rows[start..];
            let bad: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].as_ref().is_some_and(|r| r[..d].iter().any(|x| x.is_none()))).collect();
            match embedding_view(&s) {
                Ok((chunks, width, validity)) => {
                    prop_assert!(bad.is_empty());
                    prop_assert_eq!(width, d);
                    let flat: Vec<f32> = chunks.concat();
                    prop_assert_eq!(flat.len(), rows.len() * d);
                    for (i, r) in rows.iter().enumerate() {
                        if let Some(r) = r {
                            let want: Vec<f32> = r[..d].iter().map(|x| x.unwrap()).collect();
                            prop_assert_eq!(&flat[i * d..(i + 1) * d], &want[..]);
                        }
                    }
                    let want_valid: Vec<bool> = rows.iter().map(|r| r.is_some()).collect();
                    match &validity {
                        Some(v) => prop_assert_eq!(v.iter().collect::<Vec<_>>(), want_valid.clone()),
                        None => prop_assert!(want_valid.iter().all(|&x| x)),
                    }
                    // embedding_rows: the same values, or an error naming the first null row.
                    match embedding_rows(&s) {
                        Ok((buf, w)) => { prop_assert_eq!(w, d); prop_assert_eq!(&buf[..], &flat[..]); prop_assert!(want_valid.iter().all(|&x| x)); },
                        Err(e) => {
                            let first = want_valid.iter().position(|&x| !x);
                            prop_assert!(first.is_some(), "refused rows with no null: {}", e);
                            prop_assert_eq!(named_rows(&e.to_string()).first().copied(), first, "{}", e);
                        },
                    }
                },
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("'X_pca'"), "{}", msg);
                    let named = named_rows(&msg);
                    prop_assert!(!named.is_empty() && named.iter().all(|r| bad.contains(r)), "{} (bad rows {:?})", msg, bad);
                },
            }
        }
    }
}
