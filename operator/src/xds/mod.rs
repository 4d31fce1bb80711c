pub mod ads;
pub mod bootstrap;
pub mod resources;
