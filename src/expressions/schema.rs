//! Each expression's output field from its input fields: the plan-time
//! schema checks and dtypes shared by the Python plugin (`crate::python`)
//! and the lazy `Expr` builders (`crate::prelude`), so both name and type
//! their outputs the same way and refuse the same inputs with the same words.

use polars::prelude::*;

use super::convert;

/// `normalize`: inputs (values, gene_idx). The output takes the values'
/// name, so `with_columns` replaces them.
pub fn normalize(fields: &[Field]) -> PolarsResult<Field> {
    let [values, gene_idx] = fields else {
        polars_bail!(ComputeError: "normalize takes 2 inputs (gene_idx, values), got {}", fields.len());
    };
    convert::check_sparse_fields(&[gene_idx.clone(), values.clone()])?;
    Ok(Field::new(values.name().clone(), DataType::List(Box::new(DataType::Float32))))
}

/// `total_counts`: inputs (gene_idx, values); `Float32` named `total_counts`.
pub fn total_counts(fields: &[Field]) -> PolarsResult<Field> {
    convert::check_sparse_fields(fields)?;
    Ok(Field::new("total_counts".into(), DataType::Float32))
}

/// `select_genes`: inputs (gene_idx, values); a struct of both, named like
/// `gene_idx`, whose fields keep the inputs' names (`unnest` replaces them).
pub fn select_genes(fields: &[Field]) -> PolarsResult<Field> {
    convert::check_sparse_fields(fields)?;
    Ok(Field::new(fields[0].name().clone(), DataType::Struct(vec![fields[0].clone(), fields[1].clone()])))
}

/// `to_cells`: inputs (genes, values) of a published layout; a struct
/// `cells{gene_idx: List(UInt32), values: List(Float32)}`.
pub fn to_cells(fields: &[Field]) -> PolarsResult<Field> {
    convert::check_token_fields(fields)?;
    let (idx, val) = (DataType::List(Box::new(DataType::UInt32)), DataType::List(Box::new(DataType::Float32)));
    Ok(Field::new("cells".into(), DataType::Struct(vec![Field::new("gene_idx".into(), idx), Field::new("values".into(), val)])))
}

/// `pca_project`: inputs (gene_idx, values); `Array(Float32, n_comps)` named `X_pca`.
pub fn pca_project(fields: &[Field], n_comps: usize) -> PolarsResult<Field> {
    convert::check_sparse_fields(fields)?;
    Ok(Field::new("X_pca".into(), DataType::Array(Box::new(DataType::Float32), n_comps)))
}

/// `kmeans_centroids`: inputs (embedding, weights?); one row of
/// [`centroids_dtype`](super::centroids_dtype) named `centroids`.
pub fn kmeans_centroids(fields: &[Field]) -> PolarsResult<Field> {
    let Some(embedding) = fields.first() else {
        polars_bail!(ComputeError: "kmeans_centroids takes an embedding column");
    };
    let d = convert::check_embedding_field(embedding)?;
    if let Some(w) = fields.get(1) {
        if !w.dtype().is_primitive_numeric() {
            polars_bail!(ComputeError: "weights column '{}' has dtype {}, expected a number per cell", w.name(), w.dtype());
        }
    }
    Ok(Field::new("centroids".into(), super::centroids_dtype(d)))
}

/// The embedding is `Array(Float32, d)` of the model's `d`.
fn embedding_for_model(op: &str, fields: &[Field], d: usize) -> PolarsResult<Field> {
    let Some(embedding) = fields.first() else {
        polars_bail!(ComputeError: "{op} takes an embedding column");
    };
    let width = convert::check_embedding_field(embedding)?;
    super::check_model_width(op, embedding.name(), width, d)?;
    Ok(embedding.clone())
}

/// `knn_interpolate`: inputs (embedding, batch?); `Array(Float32, d)` named
/// like the embedding.
pub fn knn_interpolate(fields: &[Field], d: usize) -> PolarsResult<Field> {
    let embedding = embedding_for_model("knn_interpolate", fields, d)?;
    if let Some(b) = fields.get(1) {
        if b.dtype().is_nested() {
            polars_bail!(ComputeError: "knn_interpolate: batch column '{}' has dtype {}, expected one label per cell (string, categorical or integer)", b.name(), b.dtype());
        }
    }
    Ok(Field::new(embedding.name().clone(), DataType::Array(Box::new(DataType::Float32), d)))
}

/// `knn`: input (embedding); [`knn_dtype`](super::knn_dtype) named like it.
pub fn knn(fields: &[Field], d: usize, k: usize) -> PolarsResult<Field> {
    let embedding = embedding_for_model("knn", fields, d)?;
    Ok(Field::new(embedding.name().clone(), super::knn_dtype(k)))
}
