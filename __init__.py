"""gradserve"""
