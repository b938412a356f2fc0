"""destinations"""
