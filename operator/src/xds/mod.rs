pub mod ads;
pub mod resources;
