pub mod tams;
